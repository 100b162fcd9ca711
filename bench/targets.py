"""Issue 9's targets (and issue 14's for the MLP) as checks over a run's measurements (reported, never tuned towards).

Each check names the two measurements it compares and says "not measured" when one of them was
not part of the run. Throughputs are steady-state samples per second (medians over repeats).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from bench.measurement import Measurement


@dataclass(frozen=True)
class Check:
    target: str
    measured: float | None
    threshold: float
    higher_is_better: bool = True
    ideal: float | None = None
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.measured is None:
            return None
        if self.higher_is_better:
            return self.measured >= self.threshold
        return self.measured <= self.threshold

    def to_dict(self) -> dict:
        return {"target": self.target, "measured": self.measured, "threshold": self.threshold,
                "higher_is_better": self.higher_is_better, "ideal": self.ideal,
                "passed": self.passed, "note": self.note}


def _find(results: Sequence[Measurement], workload: str, variant: str,
          depth: int | None = None) -> Measurement | None:
    for r in results:
        if r.workload == workload and r.variant == variant and (depth is None or r.depth == depth):
            return r
    return None


def _ratio(a: Measurement | None, b: Measurement | None) -> float | None:
    if a is None or b is None:
        return None
    return a.samples_per_s / b.samples_per_s


def _max_stage(m: Measurement, what: str) -> int:
    return max(getattr(s, what) for s in m.stages)


def _ceiling_note(single: Measurement | None, depth: int) -> str:
    """The machine's ceiling for a d-stage pipeline over one process, from the single run's
    stage profile alone and co-run (the stages' balance and the co-run slowdown)."""
    note = "ideal is d for perfectly balanced stages"
    if single is not None and single.extra.get("stage_compute_ms_corun"):
        alone = [p["forward_ms"] + p["backward_ms"] for p in single.extra["stage_compute_ms"]]
        corun = [p["forward_ms"] + p["backward_ms"]
                 for p in single.extra["stage_compute_ms_corun"]]
        if len(alone) == depth:
            note += (f"; this machine's ceiling from the stages' balance and co-run slowdown: "
                     f"{sum(alone) / max(corun):.2f}")
    return note


def checks(results: Sequence[Measurement], bert_depth: int = 2, tiny_depth: int = 4,
           num_microbatches: int = 4, mlp_depth: int = 2, mlp_microbatches: int = 8
           ) -> list[Check]:
    """``results``: one representative measurement per (workload, variant, depth)."""
    d, m = bert_depth, num_microbatches
    single = _find(results, "bert", "single-1t")
    two = _find(results, "bert", "pd2bw-2bw", d)
    flush = _find(results, "bert", "pd2bw-flush", d)
    gpipe = _find(results, "bert", "pd2bw-gpipe", d)
    torch_1f1b = _find(results, "bert", "torch-1F1B", d)
    torch_gpipe = _find(results, "bert", "torch-GPipe", d)
    bubble = (d - 1) / (m + d - 1)
    note = _ceiling_note(single, d)
    out = [
        Check(f"bert d={d}: 2bw / single process (1 thread)", _ratio(two, single), 1.8,
              ideal=float(d), note=note),
        Check(f"bert d={d} m={m}: 2bw / torch Schedule1F1B", _ratio(two, torch_1f1b), 1.1,
              ideal=1 / (1 - bubble), note=f"1F1B's bubble is (d-1)/(m+d-1) = {bubble:.0%}"),
    ]
    mem = None
    if two is not None and torch_1f1b is not None:
        mem = _max_stage(two, "total") / _max_stage(torch_1f1b, "total")
    out.append(Check(f"bert d={d}: 2bw / torch Schedule1F1B, largest stage's weights + optimizer "
                     "+ peak activations", mem, 2.0, higher_is_better=False,
                     note="'same memory order': within a factor 2 (2bw keeps two weight "
                          "versions)"))
    out += [
        Check(f"bert d={d}: 2bw / flush throughput", _ratio(two, flush), 1.0,
              ideal=1 / (1 - bubble)),
        Check(f"bert d={d}: flush / gpipe throughput", _ratio(flush, gpipe), 1.0, ideal=1.0),
    ]
    for name, variant in (("2bw", two), ("flush", flush)):
        ratio = None
        if variant is not None and gpipe is not None:
            ratio = max(a.peak_activations / b.peak_activations
                        for a, b in zip(variant.stages, gpipe.stages))
        out.append(Check(f"bert d={d} m={m}: {name} / gpipe peak activations (worst stage)",
                         ratio, 0.6, higher_is_better=False, ideal=d / m,
                         note="'well below': at most 0.6; 1F1B holds d - s microbatches on "
                              "stage s, GPipe all m"))
    tiny = _find(results, "tiny", "pd2bw-2bw", tiny_depth)
    out.append(Check(f"tiny d={tiny_depth}: 2bw microbatches/s (fixed overhead)",
                     tiny.microbatches_per_s if tiny is not None else None, 300.0))
    # Issue 14 (c): a workload whose messages cost more next to its compute.
    dm, mm = mlp_depth, mlp_microbatches
    mlp_single = _find(results, "mlp", "single-1t")
    mlp_two = _find(results, "mlp", "pd2bw-2bw", dm)
    mlp_bubble = (dm - 1) / (mm + dm - 1)
    out += [
        Check(f"mlp d={dm}: 2bw / single process (1 thread)", _ratio(mlp_two, mlp_single), 1.8,
              ideal=float(dm), note=_ceiling_note(mlp_single, dm)),
        Check(f"mlp d={dm} m={mm}: 2bw / torch Schedule1F1B",
              _ratio(mlp_two, _find(results, "mlp", "torch-1F1B", dm)), 1.1,
              ideal=1 / (1 - mlp_bubble),
              note=f"1F1B's bubble is (d-1)/(m+d-1) = {mlp_bubble:.0%}"),
    ]
    # Context, not targets: the same schedule in both runtimes.
    out += [
        Check(f"bert d={d}: flush / torch Schedule1F1B (same schedule, both flush)",
              _ratio(flush, torch_1f1b), 1.0, ideal=1.0, note="informational"),
        Check(f"bert d={d}: gpipe / torch ScheduleGPipe", _ratio(gpipe, torch_gpipe), 1.0,
              ideal=1.0, note="informational"),
    ]
    return out
