"""Print how a BERT partition splits the model, without allocating it (built on the meta device).

    python -m stages.describe --bert_config_path configs/bert_config_bert-large-uncased.json \\
        --module models.bert24.depth=8 [--num_replicas 8 --write_conf conf.json]

prints layers and parameters per stage and, with ``--write_conf``, writes the matching conf.json
(stage-major ranks: stage s holds ranks s*W .. s*W+W-1).
"""

from __future__ import annotations

import argparse
import sys

from pd2bw_ray.config import ConfigError
from stages.bert import build_bert_pipeline, format_parameter_table
from stages.bert_config import BertConfigError, BertModelConfig
from stages.partition import PartitionError, format_conf_json, parse_module_spec, pipeline_conf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bert_config_path", required=True, help="Google-format bert_config.json")
    parser.add_argument("--module", required=True,
                        help="models.bert<L>.depth=<D> or models.bert<L>.layers=<n0>,<n1>,... "
                             "(n.5: half a layer, cut between attention and feed-forward)")
    parser.add_argument("--num_replicas", type=int, default=1, help="replicas per stage")
    parser.add_argument("--write_conf", default=None, help="write the conf.json here")
    args = parser.parse_args(argv)
    try:
        model_config = BertModelConfig.from_json(args.bert_config_path)
        partition = parse_module_spec(args.module, model_config.num_hidden_layers,
                                      config_source=args.bert_config_path)
        model = build_bert_pipeline(model_config, partition, device="meta")
        conf = pipeline_conf(partition.num_stages, args.num_replicas)
    except (BertConfigError, PartitionError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{partition.to_spec()} ({args.num_replicas} replica(s) per stage), "
          f"{args.bert_config_path}")
    print(format_parameter_table(model))
    text = format_conf_json(conf)
    if args.write_conf:
        with open(args.write_conf, "w") as f:
            f.write(text)
        print(f"wrote {args.write_conf}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
