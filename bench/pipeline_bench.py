"""Pipeline benchmark: pd2bw-ray's schedules against a single process and against
``torch.distributed.pipelining``, side by side in one run, on the same model, data and
microbatch settings. Writes ``<out>/<name>.md``, ``.json`` and ``.png``.

    .venv/bin/python -m bench.pipeline_bench                 # the full CPU run (minutes)
    .venv/bin/python -m bench.pipeline_bench --quick         # seconds-long smoke run
    .venv/bin/python -m bench.pipeline_bench --device cuda   # GPU variant (one GPU per stage)
    .venv/bin/python -m bench.pipeline_bench --schedules     # every schedule on BERT, d=2 m=4

The default run measures 2bw, flush and gpipe against torch's Schedule1F1B and ScheduleGPipe.
``--schedules`` adds interleaved (``--virtual-stages`` v per rank) and zb-h1 beside torch's
ScheduleInterleaved1F1B (v per rank) and ScheduleInterleavedZeroBubble (one stage per rank: its
ZB-H1 shape), on the BERT model alone, and reports each synchronous schedule's bubble against
its formula.

On a shared machine wrap it in the project's lock: ``flock /tmp/pd2bw-ray.lock ...``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
from dataclasses import asdict, dataclass
from typing import Callable

from bench import pd2bw_pipeline, report, single_process, torch_pipelining
from bench.measurement import Measurement
from bench.targets import checks
from bench.workloads import BERT_CONFIG, ROOT, BertWorkload, MlpWorkload, TinyWorkload

DEFAULT_VARIANTS = ("single", "2bw", "flush", "gpipe", "torch-1f1b", "torch-gpipe")
SCHEDULE_VARIANTS = DEFAULT_VARIANTS + ("interleaved", "zb-h1", "torch-interleaved1f1b",
                                        "torch-interleavedzb")
VARIANTS = SCHEDULE_VARIANTS
OURS = ("2bw", "flush", "gpipe", "interleaved", "zb-h1")
INTERLEAVED = ("interleaved", "Interleaved1F1B")   # the variants run with v stages per rank
MODELS = ("bert", "mlp", "tiny")
QUICK_BERT_CONFIG = os.path.join(ROOT, "configs", "bert_config_tiny.json")

NOTES = (
    "Throughput is steady state: the mean time between the ends of consecutive timed steps on "
    "the first stage, leaving out the first timed step (pipeline fill) and the last (drain); a "
    "warm-up call or steps run before. 'whole call' divides all timed samples by the whole "
    "timed call, fill, drain and (pd2bw) driver start included. Ratios compare variants of the "
    "same run; absolute numbers on a shared machine mean little.",
    "Threads: every process sets torch.set_num_threads; 'threads' is the total over the "
    "pipeline's processes. single-1t is one thread (the 2bw target's baseline); single-Nt has "
    "the same total number of threads as a pipeline of N one-thread stages, spent on intra-op "
    "parallelism instead. pd2bw stage actors ask Ray for min(threads, cores / d) CPUs.",
    "Peak activations: bytes of the distinct storages saved for backward (weights left out) "
    "plus each stage's inputs and outputs, summed over the microbatches in flight, sampled at "
    "the end of each forward, peak over the timed steps. pd2bw-ray reports it itself "
    "(stats()['peak_stash']); for the single process and torch's stages bench/activation_meter"
    ".py measures the same quantity with saved-tensor hooks. The loss function's own saved "
    "tensors (BERT: the log-softmax over the vocabulary on the last stage) are counted in no "
    "variant; peak RSS growth (each process's ru_maxrss after the last step minus before the "
    "first) catches them and everything else: gradients, a second weight version, allocator "
    "slack.",
    "Weights: every weight version a stage holds (2bw: two); optimizer: Adam's state tensors. "
    "Tied weights (BERT's word embedding and MLM decoder) are one parameter in the single "
    "process and one copy per holding stage in the pipelines, whose gradients are all-reduced "
    "each step (pd2bw: by the runtime; torch: dist.all_reduce after schedule.step).",
    "torch.distributed.pipelining gets a step's microbatches concatenated along the batch "
    "dimension and cuts them back into the same microbatches; BERT's two targets travel packed "
    "in one tensor. Its schedules drain the pipeline in every step.",
    "Ray stays initialised for the whole run, so every variant shares the same background "
    "processes; repeats run the variants round-robin and the tables show the repeat with the "
    "median throughput (the upper median for an even count); 'repeats' lists all of them.",
)


@dataclass(frozen=True)
class BenchSettings:
    """What one run measures (parsed from the command line)."""

    device: str = "cpu"
    models: tuple[str, ...] = MODELS
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    virtual_stages: int = 2
    bert_depths: tuple[int, ...] = (2,)
    tiny_depth: int = 4
    num_microbatches: int = 4
    tiny_microbatches: int = 8
    steps: int = 12
    warmup_steps: int = 2
    tiny_steps: int = 30
    tiny_warmup_steps: int = 3
    mlp_depth: int = 2
    mlp_microbatches: int = 8
    mlp_steps: int = 20
    mlp_warmup_steps: int = 3
    threads_per_stage: int = 1
    repeats: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for v in self.variants:
            if v not in VARIANTS:
                raise ValueError(f"--variants: unknown variant {v!r}; choose from "
                                 f"{', '.join(VARIANTS)}")
        for m in self.models:
            if m not in MODELS:
                raise ValueError(f"--models: unknown model {m!r}; choose from {', '.join(MODELS)}")
        if min(self.steps, self.tiny_steps, self.mlp_steps) < 4:
            raise ValueError("--steps, --tiny-steps and --mlp-steps must be at least 4 (the "
                             "first and last timed steps are left out of the steady state)")
        if self.virtual_stages < 2:
            raise ValueError(f"--virtual-stages must be at least 2 (stages per rank of the "
                             f"interleaved schedules), got {self.virtual_stages}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")


Job = tuple[str, Callable[[], Measurement]]


def plan(settings: BenchSettings, bert: BertWorkload, tiny: TinyWorkload,
         mlp: MlpWorkload | None = None) -> list[Job]:
    """The measurements of one repeat, in order: (label, thunk)."""
    cores = os.cpu_count() or 1
    threads = settings.threads_per_stage
    dev = settings.device
    gpus = _gpu_count() if dev == "cuda" else 0
    jobs: list[Job] = []
    todo = []
    if "bert" in settings.models:
        m = settings.num_microbatches
        todo.append((bert, settings.bert_depths, m, settings.warmup_steps, settings.steps))
    if "mlp" in settings.models:
        todo.append((mlp or MlpWorkload(seed=settings.seed), (settings.mlp_depth,),
                     settings.mlp_microbatches, settings.mlp_warmup_steps, settings.mlp_steps))
    if "tiny" in settings.models:
        todo.append((tiny, (settings.tiny_depth,), settings.tiny_microbatches,
                     settings.tiny_warmup_steps, settings.tiny_steps))
    for workload, depths, m, n_warm, n_timed in todo:
        data = workload.steps(n_warm + n_timed, m, seed=settings.seed + 1)
        warm, timed = data[:n_warm], data[n_warm:]
        if "single" in settings.variants:
            counts = [1] + ([threads * d for d in depths if threads * d > 1]
                            if workload is bert else [])
            for n in dict.fromkeys(counts):
                jobs.append((f"{workload.name} single-{n}t", _single(
                    workload, depths[0], warm, timed, n, dev,
                    profile=(n == 1 and workload is not tiny))))   # tiny: nothing to time
        for d in depths:
            if dev == "cuda" and gpus < d:
                print(f"skipping {workload.name} pipelines at d={d}: {gpus} GPU(s), one per "
                      "stage needed", file=sys.stderr)
                continue
            num_cpus = min(float(threads), cores / d)
            for schedule in OURS:
                if schedule in settings.variants:
                    v = settings.virtual_stages if schedule in INTERLEAVED else 1
                    jobs.append((f"{workload.name} pd2bw-{schedule} d={d}", _ours(
                        workload, d, schedule, warm, timed, threads, num_cpus, dev, v)))
            for schedule in torch_pipelining.SCHEDULES:
                if f"torch-{schedule.lower()}" in settings.variants:
                    v = settings.virtual_stages if schedule in INTERLEAVED else 1
                    jobs.append((f"{workload.name} torch-{schedule} d={d}", _theirs(
                        workload, d, schedule, warm, timed, threads, dev, v)))
    return jobs


def _single(workload, depth, warm, timed, threads, device, profile):
    return lambda: single_process.run(workload, depth, warm, timed, threads, device, profile)


def _ours(workload, depth, schedule, warm, timed, threads, num_cpus, device, virtual):
    return lambda: pd2bw_pipeline.measure(workload, depth, schedule, warm, timed,
                                          threads_per_stage=threads, num_cpus=num_cpus,
                                          device=device, virtual=virtual)


def _theirs(workload, depth, schedule, warm, timed, threads, device, virtual):
    return lambda: torch_pipelining.run(workload, depth, schedule, warm, timed, threads, device,
                                        virtual=virtual)


def _gpu_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def start_ray(settings: BenchSettings) -> bool:
    """Start a local Ray cluster unless one is running; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    env = {"PYTHONPATH": os.pathsep.join([ROOT] + [p for p in os.environ.get(
        "PYTHONPATH", "").split(os.pathsep) if p]),
           "OMP_NUM_THREADS": str(settings.threads_per_stage)}
    kwargs = {}
    if settings.device == "cuda":
        kwargs["num_gpus"] = _gpu_count()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             log_to_driver=False,
             runtime_env={"env_vars": env}, **kwargs)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.pipeline_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help="comma-separated: bert,mlp,tiny (default: all; with --schedules bert)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: "
                        f"{','.join(DEFAULT_VARIANTS)}; with --schedules every one)")
    p.add_argument("--schedules", action="store_true",
                   help="every schedule of both runtimes on the BERT model (the default "
                        "--models bert and every variant), with each bubble against its formula")
    p.add_argument("--virtual-stages", type=int, default=2,
                   help="stages per rank of the interleaved schedules (default 2)")
    p.add_argument("--bert-depths", default=None,
                   help="comma-separated pipeline depths for BERT (default: 2, and 4 when the "
                        "machine has 4 cores per thread of each stage)")
    p.add_argument("--tiny-depth", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=4, help="m for BERT (per step)")
    p.add_argument("--tiny-microbatches", type=int, default=8, help="m for the tiny model")
    p.add_argument("--steps", type=int, default=12, help="timed BERT steps (one train() call)")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--tiny-steps", type=int, default=30)
    p.add_argument("--tiny-warmup-steps", type=int, default=3)
    p.add_argument("--mlp-depth", type=int, default=2)
    p.add_argument("--mlp-microbatches", type=int, default=8, help="m for the MLP")
    p.add_argument("--mlp-steps", type=int, default=20)
    p.add_argument("--mlp-warmup-steps", type=int, default=3)
    p.add_argument("--threads-per-stage", type=int, default=1)
    p.add_argument("--microbatch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--bert-config", default=BERT_CONFIG)
    p.add_argument("--partition", action="append", default=[], metavar="D=N0,N1,...",
                   help="encoder layers per stage for depth D (repeatable), e.g. 2=5,3")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every variant this many times, round-robin; report medians")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="results file name (default: the device, "
                                                "'quick-...' with --quick)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny BERT (configs/bert_config_tiny.json), 16 tokens, "
                        "4 timed steps; checks the harness, measures nothing meaningful")
    return p.parse_args(argv)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> dict[str, str]:
    args = parse_args(argv)
    cores = os.cpu_count() or 1
    if args.bert_depths:
        depths = _ints(args.bert_depths)
    else:
        depths = (2, 4) if cores >= 4 * args.threads_per_stage else (2,)
    partitions = tuple((int(d), _ints(layers)) for d, layers in
                       (p.split("=", 1) for p in args.partition))
    if args.quick:
        bert = BertWorkload(config_path=QUICK_BERT_CONFIG, microbatch_size=2, seq_length=16,
                            partitions=partitions, seed=args.seed)
        steps, warm, tiny_steps, tiny_warm = 4, 1, 5, 1
        mlp = MlpWorkload(width=64, microbatch_size=4, seed=args.seed)
        mlp_steps, mlp_warm = 4, 1
    else:
        bert = BertWorkload(config_path=args.bert_config, microbatch_size=args.microbatch_size,
                            seq_length=args.seq_length, seed=args.seed,
                            **({"partitions": partitions} if partitions else {}))
        steps, warm = args.steps, args.warmup_steps
        tiny_steps, tiny_warm = args.tiny_steps, args.tiny_warmup_steps
        mlp = MlpWorkload(seed=args.seed)
        mlp_steps, mlp_warm = args.mlp_steps, args.mlp_warmup_steps
    models = args.models or ("bert" if args.schedules else ",".join(MODELS))
    variants = args.variants or ",".join(SCHEDULE_VARIANTS if args.schedules
                                         else DEFAULT_VARIANTS)
    settings = BenchSettings(
        device=args.device, models=tuple(x for x in models.split(",") if x),
        variants=tuple(x for x in variants.split(",") if x),
        virtual_stages=args.virtual_stages, bert_depths=depths,
        tiny_depth=args.tiny_depth, num_microbatches=args.microbatches,
        tiny_microbatches=args.tiny_microbatches, steps=steps, warmup_steps=warm,
        tiny_steps=tiny_steps, tiny_warmup_steps=tiny_warm, mlp_depth=args.mlp_depth,
        mlp_microbatches=args.mlp_microbatches, mlp_steps=mlp_steps, mlp_warmup_steps=mlp_warm,
        threads_per_stage=args.threads_per_stage, repeats=args.repeats, seed=args.seed)
    tiny = TinyWorkload(seed=args.seed)
    name = args.name or (("quick-" if args.quick else "") + ("schedules-" if args.schedules
                                                              else "") + args.device)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    machine = report.machine_info()
    jobs = plan(settings, bert, tiny, mlp)
    needs_ray = any(" pd2bw-" in label for label, _ in jobs)
    we_started = start_ray(settings) if needs_ray else False
    results: list[Measurement] = []
    try:
        for r in range(settings.repeats):
            for label, job in jobs:
                m = job()
                results.append(m)
                rate = (f"{m.microbatches_per_s:.1f} microbatches/s" if m.workload == "tiny"
                        else f"{m.samples_per_s:.2f} samples/s")
                print(f"[{r + 1}/{settings.repeats}] {label}: {rate} (step "
                      f"{1e3 * m.period:.1f} ms)", flush=True)
    finally:
        if we_started:
            import ray
            ray.shutdown()
    run = report.BenchRun(
        name=name, started=started,
        command=" ".join(["python -m bench.pipeline_bench"] + [shlex.quote(a) for a in
                                                               (argv if argv is not None
                                                                else sys.argv[1:])]),
        machine=machine, versions=report.versions(),
        settings={k: (list(v) if isinstance(v, tuple) else v)
                  for k, v in asdict(settings).items()},
        workloads={w.name: w.describe({"bert": depths, "mlp": (settings.mlp_depth,)}.get(
                       w.name, (settings.tiny_depth,)))
                   for w in (bert, mlp, tiny) if w.name in settings.models},
        measurements=tuple(results), notes=NOTES)
    run = report.BenchRun(**{**run.__dict__, "checks": tuple(checks(
        run.representatives(), bert_depth=depths[0], tiny_depth=settings.tiny_depth,
        num_microbatches=settings.num_microbatches, mlp_depth=settings.mlp_depth,
        mlp_microbatches=settings.mlp_microbatches, virtual_stages=settings.virtual_stages,
        repeats=run.measurements))})
    paths = report.write(run, args.out)
    for c in run.checks:
        verdict = {True: "pass", False: "MISS", None: "not measured"}[c.passed]
        got = "-" if c.measured is None else f"{c.measured:.3f}"
        paired = (f"; within each repeat {report.paired_text(c)}" if c.paired else "")
        print(f"{verdict:>12}  {c.target}: {got} (threshold {c.threshold:g}{paired})")
    print("wrote " + ", ".join(paths.values()))
    return paths


if __name__ == "__main__":
    main()
