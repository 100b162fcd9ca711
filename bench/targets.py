"""Issue 9's targets (issue 14's for the MLP, issue 17's for the schedules) as checks over a run's
measurements (reported, never tuned towards).

Each check names the two measurements it compares and says "not measured" when one of them was
not part of the run. Throughputs are steady-state samples per second; a ratio is that of the two
variants' median repeats (what passes or misses). Beside it, ``paired``: the ratio within each
repeat (the variants run round-robin, so the two measurements of one repeat were taken minutes
apart), whose median and range show how far this machine's noise moves the result.
"""

from __future__ import annotations

import statistics
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
    paired: tuple[float, ...] = ()     # the same ratio within each repeat, in repeat order

    @property
    def passed(self) -> bool | None:
        if self.measured is None:
            return None
        if self.higher_is_better:
            return self.measured >= self.threshold
        return self.measured <= self.threshold

    @property
    def paired_median(self) -> float | None:
        return statistics.median(self.paired) if self.paired else None

    def to_dict(self) -> dict:
        return {"target": self.target, "measured": self.measured, "threshold": self.threshold,
                "higher_is_better": self.higher_is_better, "ideal": self.ideal,
                "passed": self.passed, "note": self.note, "paired": list(self.paired),
                "paired_median": self.paired_median}


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


def paired_ratios(repeats: Sequence[Measurement], a: Measurement | None,
                  b: Measurement | None) -> tuple[float, ...]:
    """Throughput of ``a``'s variant over ``b``'s within each repeat: ``repeats`` is every
    measurement of the run in the order taken, so the i-th of one variant pairs with the i-th of
    the other."""
    if a is None or b is None:
        return ()

    def rates(x: Measurement) -> list[float]:
        return [m.samples_per_s for m in repeats
                if (m.workload, m.variant, m.depth) == (x.workload, x.variant, x.depth)]

    return tuple(p / q for p, q in zip(rates(a), rates(b)))


def _vs(repeats: Sequence[Measurement], target: str, a: Measurement | None,
        b: Measurement | None, threshold: float, **kw) -> Check:
    """A check of ``a``'s throughput over ``b``'s, with the ratio within each repeat."""
    return Check(target, _ratio(a, b), threshold, paired=paired_ratios(repeats, a, b), **kw)


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


SYNCHRONOUS = ("pd2bw-flush", "pd2bw-gpipe", "pd2bw-interleaved", "pd2bw-zb-h1", "torch-1F1B",
               "torch-GPipe", "torch-Interleaved1F1B", "torch-InterleavedZB")
NEW_SCHEDULES = ("pd2bw-interleaved", "pd2bw-zb-h1", "torch-Interleaved1F1B",
                 "torch-InterleavedZB")


def split_backward_ms(m: Measurement) -> tuple[float, float, float] | None:
    """Mean forward, input-gradient and weight-gradient milliseconds per microbatch over the
    stages, from a pd2bw zb-h1 run's action log."""
    actions = m.extra.get("actions") or {}
    try:
        per = [(a["forward"]["mean_ms"], a["backward input"]["mean_ms"],
                a["backward weight"]["mean_ms"]) for a in actions.values()]
    except KeyError:
        return None
    if not per:
        return None
    return tuple(sum(x[i] for x in per) / len(per) for i in range(3))   # type: ignore[return-value]


def bubble_formula(variant: str, d: int, m: int, v: int,
                   fbw: tuple[float, float, float] | None) -> tuple[float | None, str]:
    """The bubble fraction a synchronous schedule's formula predicts: idle time over the step's
    span, for equal stages."""
    if variant in ("pd2bw-flush", "pd2bw-gpipe", "torch-1F1B", "torch-GPipe"):
        return (d - 1) / (m + d - 1), "(d-1)/(m+d-1)"
    if variant in ("pd2bw-interleaved", "torch-Interleaved1F1B"):
        return (d - 1) / (v * m + d - 1), f"(d-1)/(v*m+d-1), v={v}"
    if variant in ("pd2bw-zb-h1", "torch-InterleavedZB"):
        if fbw is None:
            return None, "needs zb-h1's F, B, W times"
        f, b, w = fbw
        idle = (d - 1) * max(0.0, f + b - w)
        return idle / (m * (f + b + w) + idle), (
            f"(d-1)(F+B-W)/(m(F+B+W)+(d-1)(F+B-W)), F/B/W = {f:.0f}/{b:.0f}/{w:.0f} ms "
            "(zb-h1's action log)")
    return None, ""


def bubble_rows(results: Sequence[Measurement], d: int, m: int, v: int
                ) -> list[tuple[str, float, float | None, str]]:
    """Per synchronous schedule measured: (variant, measured bubble, formula's, formula). The
    measured bubble is 1 - its throughput / 2bw's (2bw has no bubble in steady state and does
    the same computation per microbatch)."""
    two = _find(results, "bert", "pd2bw-2bw", d)
    if two is None:
        return []
    zb = _find(results, "bert", "pd2bw-zb-h1", d)
    fbw = split_backward_ms(zb) if zb is not None else None
    rows = []
    for variant in SYNCHRONOUS:
        x = _find(results, "bert", variant, d)
        if x is None:
            continue
        predicted, formula = bubble_formula(variant, d, m, v, fbw)
        rows.append((variant, 1 - x.samples_per_s / two.samples_per_s, predicted, formula))
    return rows


def schedule_checks(results: Sequence[Measurement], d: int, m: int, v: int,
                    repeats: Sequence[Measurement] = ()) -> list[Check]:
    """Issue 17: the new schedules against torch's, and 2bw against every schedule."""
    find = {name: _find(results, "bert", name, d) for name in ("pd2bw-2bw", *SYNCHRONOUS)}
    out = [
        _vs(repeats, f"bert d={d} m={m}: zb-h1 / torch ScheduleInterleavedZeroBubble (1 stage "
            "per rank)", find["pd2bw-zb-h1"], find["torch-InterleavedZB"], 1.0, ideal=1.0),
        _vs(repeats, f"bert d={d} m={m} v={v}: interleaved / torch ScheduleInterleaved1F1B",
            find["pd2bw-interleaved"], find["torch-Interleaved1F1B"], 1.0, ideal=1.0),
    ]
    two = find["pd2bw-2bw"]
    others = [x for name, x in find.items() if name != "pd2bw-2bw" and x is not None]
    best = max(others, key=lambda x: x.samples_per_s) if others else None
    # within each repeat, 2bw against whichever other schedule was fastest in that repeat
    per_other = [paired_ratios(repeats, two, x) for x in others]
    paired = tuple(min(r) for r in zip(*per_other)) if per_other else ()
    out.append(Check(f"bert d={d} m={m}: 2bw / the fastest other schedule"
                     + (f" ({best.variant})" if best is not None else ""),
                     _ratio(two, best), 1.0, note="2bw still the fastest", paired=paired))
    return out


def checks(results: Sequence[Measurement], bert_depth: int = 2, tiny_depth: int = 4,
           num_microbatches: int = 4, mlp_depth: int = 2, mlp_microbatches: int = 8,
           virtual_stages: int = 2, repeats: Sequence[Measurement] = ()) -> list[Check]:
    """``results``: one representative measurement per (workload, variant, depth);
    ``repeats``: every measurement of the run, in the order taken (for the paired ratios)."""
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
        _vs(repeats, f"bert d={d}: 2bw / single process (1 thread)", two, single, 1.8,
            ideal=float(d), note=note),
        _vs(repeats, f"bert d={d} m={m}: 2bw / torch Schedule1F1B", two, torch_1f1b, 1.1,
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
        _vs(repeats, f"bert d={d}: 2bw / flush throughput", two, flush, 1.0,
            ideal=1 / (1 - bubble)),
        _vs(repeats, f"bert d={d}: flush / gpipe throughput", flush, gpipe, 1.0, ideal=1.0),
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
        _vs(repeats, f"mlp d={dm}: 2bw / single process (1 thread)", mlp_two, mlp_single, 1.8,
            ideal=float(dm), note=_ceiling_note(mlp_single, dm)),
        _vs(repeats, f"mlp d={dm} m={mm}: 2bw / torch Schedule1F1B", mlp_two,
            _find(results, "mlp", "torch-1F1B", dm), 1.1, ideal=1 / (1 - mlp_bubble),
            note=f"1F1B's bubble is (d-1)/(m+d-1) = {mlp_bubble:.0%}"),
    ]
    if any(_find(results, "bert", name, d) is not None for name in NEW_SCHEDULES):
        out += schedule_checks(results, d, m, virtual_stages, repeats)
    # Context, not targets: the same schedule in both runtimes.
    out += [
        _vs(repeats, f"bert d={d}: flush / torch Schedule1F1B (same schedule, both flush)",
            flush, torch_1f1b, 1.0, ideal=1.0, note="informational"),
        _vs(repeats, f"bert d={d}: gpipe / torch ScheduleGPipe", gpipe, torch_gpipe, 1.0,
            ideal=1.0, note="informational"),
    ]
    return out
