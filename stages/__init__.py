"""BERT pre-training as pipeline stages for pd2bw_ray (used from the repo root, like Megatron's
tasks/).

A job builds the model from its flags::

    model_config = BertModelConfig.from_json(args.bert_config_path)
    partition = parse_module_spec(args.module, model_config.num_hidden_layers,
                                  config_source=args.bert_config_path)
    model = build_bert_pipeline(model_config, partition, seed=args.seed)
    initial = load_hf_checkpoint(args.init_checkpoint, model) if args.init_checkpoint else None
    model.check_pipeline_config(pipeline_config)
    PipelineTrainer(modules=list(model.modules), loss_fn=model.loss_fn,
                    tied_parameters=[list(g) for g in model.tied_parameters],
                    initial_state_dict=initial, config=pipeline_config, ...)

Modules: `stages.bert_config` (bert_config.json), `stages.partition` (--module, conf.json),
`stages.bert` (the stages), `stages.hf_interop` (transformers checkpoints), `stages.bert_batches`
(random microbatches), `stages.describe` (a command printing a partition's parameters),
`stages.bert_checkpoint` (a pre-training checkpoint merged back into one BERT, with its record of
modules and stages), `stages.bert_planner` and `stages.plan` (BERT's side of the planner:
profiling, ``--module ...depth=auto``, ``python -m stages.plan``).
"""

from stages.bert import (BertPipelineModel, BertPretrainingLoss, BertStage, build_bert_pipeline,
                         format_parameter_table, stage_parameter_counts, tied_copy_count)
from stages.bert_config import BertConfigError, BertModelConfig
from stages.hf_interop import (CheckpointError, export_hf_checkpoint, hf_to_pipeline_state_dict,
                               load_hf_checkpoint, pipeline_to_hf_state_dict)
from stages.partition import (BertPartition, PartitionError, balanced_partition, format_conf_json,
                              parse_module_spec, pipeline_conf)

__all__ = [
    "BertConfigError", "BertModelConfig", "BertPartition", "BertPipelineModel",
    "BertPretrainingLoss", "BertStage", "CheckpointError", "PartitionError", "balanced_partition",
    "build_bert_pipeline", "export_hf_checkpoint", "format_conf_json", "format_parameter_table",
    "hf_to_pipeline_state_dict", "load_hf_checkpoint", "parse_module_spec", "pipeline_conf",
    "pipeline_to_hf_state_dict", "stage_parameter_counts", "tied_copy_count",
]
