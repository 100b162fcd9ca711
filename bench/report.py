"""A benchmark run's record and how it is written: ``<name>.json`` (everything), ``<name>.md``
(tables: machine, versions, settings, targets, throughput, memory, where pd2bw's time goes) and
``<name>.png`` (throughput and per-stage activation memory side by side)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from typing import Any, Sequence

from bench.measurement import Measurement
from bench.targets import Check, bubble_rows
from bench.workloads import ROOT

MiB = 1024 * 1024


@dataclass(frozen=True)
class BenchRun:
    name: str
    started: str
    command: str
    machine: dict[str, Any]
    versions: dict[str, Any]
    settings: dict[str, Any]
    workloads: dict[str, Any]
    measurements: tuple[Measurement, ...]        # every repeat
    checks: tuple[Check, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def representatives(self) -> list[Measurement]:
        """Per (workload, variant, depth), the repeat with the median steady throughput (the
        upper median for an even count)."""
        return [group[len(group) // 2] for group in self._groups().values()]

    def _groups(self) -> dict[tuple[str, str, int], list[Measurement]]:
        groups: dict[tuple[str, str, int], list[Measurement]] = {}
        for m in self.measurements:
            groups.setdefault((m.workload, m.variant, m.depth), []).append(m)
        return {k: sorted(v, key=lambda m: m.samples_per_s) for k, v in groups.items()}

    def spread(self, m: Measurement) -> list[float]:
        return [x.samples_per_s for x in self._groups()[(m.workload, m.variant, m.depth)]]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "started": self.started, "command": self.command,
                "machine": self.machine, "versions": self.versions, "settings": self.settings,
                "workloads": self.workloads, "checks": [c.to_dict() for c in self.checks],
                "notes": list(self.notes),
                "measurements": [m.to_dict() for m in self.measurements],
                "representatives": [f"{m.workload}/{m.variant}/d{m.depth}"
                                    for m in self.representatives()]}


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    mem = None
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
        with open("/proc/meminfo") as f:
            for ln in f:
                if ln.startswith("MemTotal"):
                    mem = round(int(ln.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    info: dict[str, Any] = {"host": platform.node(), "platform": platform.platform(),
                            "cpu": cpu, "cpu_count": os.cpu_count(), "memory_gib": mem,
                            "load_average_at_start": list(os.getloadavg())}
    try:
        import torch
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i)
                            for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - informational
        pass
    return info


def versions() -> dict[str, Any]:
    import ray
    import torch
    import transformers

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    return {"python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "transformers": transformers.__version__,
            "pd2bw-ray commit": git("rev-parse", "--short", "HEAD"),
            "working tree": "modified" if git("status", "--porcelain", "--", "pd2bw_ray",
                                              "stages") else "clean"}


# ------------------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def paired_text(c: Check) -> str:
    """A check's per-repeat ratios as "median [lowest, highest]" ("-" without repeats)."""
    if not c.paired:
        return "-"
    return f"{_fmt(c.paired_median)} [{_fmt(min(c.paired))}, {_fmt(max(c.paired))}]"


def _mib(n: int) -> str:
    return f"{n / MiB:.1f}"


def markdown(run: BenchRun) -> str:
    reps = run.representatives()
    out = [f"# Pipeline benchmark `{run.name}`", "",
           f"Run {run.started}: `{run.command}`", ""]
    out += ["## Machine, versions, settings", ""]
    out += _table(["", ""], [(k, v) for k, v in {**run.machine, **run.versions}.items()])
    out += _table(["setting", "value"], list(run.settings.items()))
    for name, desc in run.workloads.items():
        out += [f"Workload `{name}`: " + ", ".join(f"{k} = {v}" for k, v in desc.items()), ""]

    out += ["## Targets", "",
            "'measured' compares the two variants' median repeats and decides the result; "
            "'within each repeat' is the same ratio taken repeat by repeat (the variants run "
            "round-robin): its median and range show how much this machine's noise moves it.",
            ""]
    out += _table(["target", "measured", "within each repeat: median [range]", "threshold",
                   "ideal", "result", "note"], [
        (c.target, _fmt(c.measured), paired_text(c),
         ("≥ " if c.higher_is_better else "≤ ") + f"{c.threshold:g}",
         _fmt(c.ideal), {True: "pass", False: "**MISS**", None: "not measured"}[c.passed],
         c.note) for c in run.checks])

    for workload in dict.fromkeys(m.workload for m in reps):
        rows = [m for m in reps if m.workload == workload]
        base = next((m for m in rows if m.variant == "single-1t"), None)
        unit = "samples/s" if workload != "tiny" else "microbatches/s"
        out += [f"## `{workload}`: steady-state throughput", ""]
        table = []
        for m in rows:
            rate = m.samples_per_s if workload != "tiny" else m.microbatches_per_s
            spread = run.spread(m)
            if workload == "tiny":
                spread = [x / m.microbatch_size for x in spread]
            table.append((
                m.variant, m.framework, m.schedule, m.depth, m.threads_total,
                m.num_microbatches, f"{rate:.2f}",
                _fmt(m.samples_per_s / base.samples_per_s) if base else "-",
                f"{1e3 * m.period:.1f}",
                f"{m.call_samples_per_s / (m.microbatch_size if workload == 'tiny' else 1):.2f}",
                " / ".join(f"{x:.2f}" for x in spread) if len(spread) > 1 else "-",
                _fmt(m.losses[-1], 3) if m.losses else "-"))
        out += _table(["variant", "framework", "schedule", "d", "threads", "m", unit,
                       "x single-1t", "step ms", f"{unit} (whole call)", "repeats",
                       "last loss"], table)
        out += [f"## `{workload}`: memory per stage (MiB)", ""]
        out += _table(
            ["variant", "stage", "weights", "optimizer", "peak activations", "peak in flight",
             "weights+opt+act", "peak RSS growth"],
            [(m.variant, s.stage, _mib(s.weights), _mib(s.optimizer), _mib(s.peak_activations),
              s.peak_in_flight, _mib(s.total), _mib(s.rss_growth))
             for m in rows for s in m.stages])
        prof = next((m for m in rows if m.extra.get("stage_compute_ms")), None)
        if prof is not None:
            profile = prof.extra["stage_compute_ms"]
            corun = prof.extra.get("stage_compute_ms_corun")
            d = len(profile)
            out += [f"## `{workload}`: stage balance (one thread per process; the stages of "
                    f"d = {d})", "",
                    "Forward and backward of each stage, microbatch by microbatch in one "
                    "process ('alone'), and the same in d processes started together "
                    "('co-run': what each stage of a d-stage pipeline gets from this machine, "
                    "with no communication at all).", ""]
            per = [p["forward_ms"] + p["backward_ms"] for p in profile]
            both = [c["forward_ms"] + c["backward_ms"] for c in corun] if corun else None
            out += _table(["stage", "forward ms", "backward ms", "forward+backward ms (alone)",
                           "forward+backward ms (co-run)"],
                          [(s, f"{p['forward_ms']:.1f}", f"{p['backward_ms']:.1f}",
                            f"{per[s]:.1f}", f"{both[s]:.1f}" if both else "-")
                           for s, p in enumerate(profile)])
            out += [f"Ideal speedup of d = {d} stages from their balance alone: sum(alone) / "
                    f"max(alone) = {sum(per) / max(per):.2f}."]
            if both:
                out += [f"With the co-run slowdown of this machine: sum(alone) / max(co-run) = "
                        f"{sum(per) / max(both):.2f} (optimizer steps and communication left "
                        "out): the most any d-process pipeline can gain here."]
            out += [""]
        ours = [m for m in rows if m.framework == "pd2bw-ray"]
        if ours:
            out += [f"## `{workload}`: where pd2bw-ray's stage time goes (timed call, action "
                    "log)", "",
                    "Per stage: mean milliseconds per action and share of the stage's span. "
                    "'between actions' is time outside any action: waiting for the next chunk "
                    "from the driver, or the executor's own bookkeeping.", ""]
            rows_ = []
            for m in ours:
                for s, costs in m.extra["actions"].items():
                    parts = [f"{k} {v['mean_ms']:.2f} ms ({v['share']:.0%})"
                             for k, v in costs.items() if isinstance(v, dict) and "mean_ms" in v]
                    parts.append(f"between actions {costs['between actions']['share']:.0%}")
                    rows_.append((m.variant, s, "; ".join(parts)))
            out += _table(["variant", "stage", "actions"], rows_)
        out += _compute_beside_torch(workload, rows)
    out += _bubble_section(run, reps)
    if run.notes:
        out += ["## How it was measured", ""] + [f"- {n}" for n in run.notes] + [""]
    return "\n".join(out)


# torch's schedule -> pd2bw-ray's schedule of the same order (2bw where that one was not run:
# every schedule computes the same forward and backward passes)
SAME_SCHEDULE = {"1F1B": "flush", "GPipe": "gpipe", "Interleaved1F1B": "interleaved",
                 "InterleavedZB": "zb-h1"}


def _compute_beside_torch(workload: str, rows: Sequence[Measurement]) -> list[str]:
    """Each computation's median time in pd2bw-ray's actors beside the same computation in
    torch's processes, measured in the same run: whether a throughput gap is in the computing
    itself or between the computations."""
    ours = {m.schedule: m for m in rows
            if m.framework == "pd2bw-ray" and m.extra.get("compute_ms")}
    pairs = []
    for m in rows:
        if m.framework.startswith("torch") and m.extra.get("compute_ms"):
            mine = ours.get(SAME_SCHEDULE.get(m.schedule, "")) or ours.get("2bw")
            if mine is not None:
                pairs.append((mine, m))
    if not pairs:
        return []
    out = [f"## `{workload}`: each computation, pd2bw-ray beside torch (same run)", "",
           "Median milliseconds of each (virtual) stage's forward (F), whole backward (B) or "
           "split backward (I: input gradient, W: weight gradient) over the timed steps: "
           "pd2bw-ray's from its action log, torch's timed around `forward_one_chunk`, "
           "`backward_one_chunk` and `backward_weight_one_chunk`. Torch computes the loss outside "
           "its forward (pd2bw-ray's last-stage forward includes it); the loss's backward is in "
           "both last-stage backwards. 'all' sums the medians: one microbatch through every "
           "stage.", ""]
    table = []
    for mine, theirs in pairs:
        a, b = mine.extra["compute_ms"], theirs.extra["compute_ms"]
        total_a = total_b = 0.0
        for stage in sorted(set(a) & set(b), key=int):
            for kind in sorted(set(a[stage]) & set(b[stage]), key="FBIW".index):
                x, y = a[stage][kind]["median_ms"], b[stage][kind]["median_ms"]
                total_a, total_b = total_a + x, total_b + y
                table.append((mine.variant, theirs.variant, stage, kind, f"{x:.1f}", f"{y:.1f}",
                              _fmt(x / y)))
        if total_b > 0:
            table.append((mine.variant, theirs.variant, "all", "", f"{total_a:.1f}",
                          f"{total_b:.1f}", _fmt(total_a / total_b)))
    return out + _table(["pd2bw-ray", "torch", "stage", "computation", "pd2bw-ray ms",
                         "torch ms", "pd2bw-ray / torch"], table)


def _bubble_section(run: BenchRun, reps: Sequence[Measurement]) -> list[str]:
    """Each synchronous schedule's bubble, measured against 2bw's throughput, beside its formula
    and its peak activations per rank."""
    d = (run.settings.get("bert_depths") or [2])[0]
    m = run.settings.get("num_microbatches", 4)
    v = run.settings.get("virtual_stages", 2)
    rows = bubble_rows(reps, d, m, v)
    if not rows:
        return []
    by_variant = {x.variant: x for x in reps if x.workload == "bert" and x.depth == d}
    table = []
    for variant, measured, predicted, formula in rows:
        x = by_variant[variant]
        table.append((variant, x.extra.get("virtual_stages", 1), f"{measured:.1%}",
                      "-" if predicted is None else f"{predicted:.1%}", formula,
                      " / ".join(_mib(s.peak_activations) for s in x.stages),
                      " / ".join(str(s.peak_in_flight) for s in x.stages)))
    return [f"## `bert`: the synchronous schedules' bubble (d = {d}, m = {m})", "",
            "Measured bubble: 1 - the schedule's steady throughput / 2bw's (2bw has no bubble "
            "in steady state and computes the same microbatches). The formula assumes equal "
            "stages and free communication. Peak activations and microbatches in flight per "
            "rank (a rank's virtual stages summed).", ""] + _table(
        ["variant", "stages per rank", "bubble (measured)", "bubble (formula)", "formula",
         "peak activations per rank (MiB)", "peak in flight per rank"], table)


def chart(run: BenchRun, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reps = run.representatives()
    workloads = list(dict.fromkeys(m.workload for m in reps))
    fig, axes = plt.subplots(len(workloads), 2, figsize=(13, 4.2 * len(workloads)),
                             squeeze=False)
    for row, workload in enumerate(workloads):
        ms = [m for m in reps if m.workload == workload]
        base = next((m for m in ms if m.variant == "single-1t"), None)
        tiny = workload == "tiny"
        ax = axes[row][0]
        shown = [m for m in ms if not (tiny and m.framework == "single process")]
        vals = [m.microbatches_per_s if tiny else m.samples_per_s for m in shown]
        colors = ["#888888" if m.framework == "single process" else
                  "#1f77b4" if m.framework == "pd2bw-ray" else "#ff7f0e" for m in shown]
        bars = ax.bar([f"{m.variant}\nd={m.depth}" for m in shown], vals, color=colors)
        for b, m, v in zip(bars, shown, vals):
            txt = f"{v:.0f}/s" if tiny else (
                f"{m.samples_per_s / base.samples_per_s:.2f}x" if base else "")
            ax.annotate(txt, (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
        if tiny:
            ax.axhline(300, color="red", linestyle="--", linewidth=1, label="target 300/s")
            ax.legend(fontsize=8)
            ax.set_ylabel("microbatches/s")
            ax.set_title(f"{workload}: steady-state microbatches/s (fixed overhead)"
                         + (f"; single process {base.microbatches_per_s:.0f}/s" if base else ""),
                         fontsize=10)
        else:
            if base is not None:
                depth = max(m.depth for m in ms)
                ax.axhline(depth * base.samples_per_s, color="gray", linestyle=":",
                           linewidth=1, label=f"{depth}x single-1t")
                ax.legend(fontsize=8)
            ax.set_ylabel("samples/s")
            ax.set_title(f"{workload}: steady-state throughput (x = vs single-1t)", fontsize=10)
        ax.tick_params(axis="x", labelsize=7)
        ax = axes[row][1]
        ours = next((m for m in ms if m.variant == "pd2bw-2bw"), None)
        if tiny and ours is not None:
            _time_shares(ax, ours)
            continue
        piped = [m for m in ms if m.depth > 1]
        depth = max((m.depth for m in piped), default=1)
        width = 0.8 / max(1, depth)
        for s in range(depth):
            xs = [i + s * width for i in range(len(piped))]
            ys = [m.stages[s].peak_activations / MiB if s < len(m.stages) else 0 for m in piped]
            ax.bar(xs, ys, width=width, label=f"stage {s}")
        ax.set_xticks([i + width * (depth - 1) / 2 for i in range(len(piped))])
        ax.set_xticklabels([m.variant for m in piped], fontsize=7)
        ax.set_ylabel("MiB")
        ax.set_title(f"{workload}: peak activations held for backward, per stage", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"{run.name}: {run.machine.get('cpu')} ({run.machine.get('cpu_count')} cores)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _time_shares(ax: Any, m: Measurement) -> None:
    """Stacked shares of each stage's span by action kind (pd2bw-ray's action log)."""
    actions = m.extra["actions"]
    stages = sorted(actions, key=int)
    kinds = sorted({k for s in stages for k, v in actions[s].items() if isinstance(v, dict)},
                   key=lambda k: (k == "between actions", k))
    bottom = [0.0] * len(stages)
    for kind in kinds:
        ys = [actions[s].get(kind, {}).get("share", 0.0) for s in stages]
        ax.bar([f"stage {s}" for s in stages], ys, bottom=bottom, label=kind)
        bottom = [b + y for b, y in zip(bottom, ys)]
    ax.set_ylabel("share of the stage's time")
    ax.set_title(f"{m.workload}: where {m.variant}'s time goes (action log)", fontsize=10)
    ax.legend(fontsize=7, ncol=3)


def write(run: BenchRun, out_dir: str) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{run.name}.{ext}") for ext in ("md", "json", "png")}
    with open(paths["json"], "w") as f:
        json.dump(run.to_dict(), f, indent=1, default=str)
        f.write("\n")
    with open(paths["md"], "w") as f:
        f.write(markdown(run))
    chart(run, paths["png"])
    return paths

