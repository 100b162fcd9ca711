"""Pictures of a run: the action log as a Chrome trace, a pipeline timeline and a loss curve.

``trainer.action_log()`` gives, per (stage, replica), what that replica executed in the last
``train()`` call: ``executor.Event`` tuples ``(category, action, start, end)`` with the
``schedule.Action`` itself and wall-clock seconds. Actions are named by their ``str()``
(``F3.1@v2``, ``RA3.1:0``, ``U3->v4``, ...) in the trace and the picture only. From the log:

- ``chrome_trace`` / ``write_chrome_trace``: the Trace Event Format JSON that Perfetto
  (ui.perfetto.dev) and chrome://tracing open, one track per stage replica;
- ``draw_timeline``: a PNG in the style of the PipeDream-2BW paper's figures (stages as rows, time
  on x, forward and backward boxes coloured by microbatch);
- ``draw_loss_curve``: loss (and learning rate) per step, from a list or ``train_log.jsonl``;
- ``parse_action``: a label (a trace event's name) back into its ``Action``;
  ``restrict_steps``: a log's last steps.

Times of different replicas are compared as they are: on one node they share a clock, across
nodes they are only as aligned as the nodes' clocks.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .schedule import Action, Kind

ActionLog = Mapping[tuple[int, int], Sequence[tuple[str, Action, float, float]]]

_STAGE = r"(?:s(\d+):)?"     # the virtual stage, where a rank holds several
_COMPUTE = re.compile(_STAGE + r"(F|B|I|W)(\d+)\.(\d+)@v(\d+)")
_MESSAGE = re.compile(_STAGE + r"(SA|RA|SG|RG)(\d+)\.(\d+):(\d+)")
_UPDATE = re.compile(r"U(\d+)->v(\d+)")
_REDUCE = re.compile(r"R(\d+)")
# How draw_timeline fills the box of each computation: forward plain, backward hatched (a split
# backward's input-gradient half like a whole one, its weight-gradient half dotted)
_HATCH = {Kind.FORWARD: None, Kind.BACKWARD: "//", Kind.BACKWARD_INPUT: "//",
          Kind.BACKWARD_WEIGHT: ".."}


def parse_action(label: str) -> Action:
    """The ``Action`` whose ``str()`` is ``label`` (the inverse of ``Action.__str__``).

    ``F3.1@v2`` is the forward of step 3 microbatch 1 on weight version 2 (``B`` backward, ``I``
    and ``W`` its input- and weight-gradient halves); ``RA3.1:0`` receives its activations from
    stage 0 (``SA`` sends them, ``RG``/``SG`` the gradients); ``R3`` reduces step 3's gradients;
    ``U3->v4`` applies that update, creating version 4. A prefix ``s5:`` names the (virtual)
    stage where a rank holds several. Fields that do not apply are -1 (microbatch, version) or
    None (peer, stage).
    """
    if m := _COMPUTE.fullmatch(label):
        return Action(Kind(m[2]), int(m[3]), int(m[4]), version=int(m[5]),
                      stage=None if m[1] is None else int(m[1]))
    if m := _MESSAGE.fullmatch(label):
        return Action(Kind(m[2]), int(m[3]), int(m[4]), peer=int(m[5]),
                      stage=None if m[1] is None else int(m[1]))
    if m := _UPDATE.fullmatch(label):
        return Action(Kind.UPDATE, int(m[1]), version=int(m[2]))
    if m := _REDUCE.fullmatch(label):
        return Action(Kind.REDUCE, int(m[1]))
    raise ValueError(f"not an action label: {label!r}; expected e.g. 'F3.1@v2', 'B3.1@v2', "
                     "'RA3.1:0', 'SG3.1:1', 'R3' or 'U3->v4'")


def restrict_steps(action_log: ActionLog, last_steps: int) -> dict[tuple[int, int], list]:
    """The actions of the log's last ``last_steps`` steps (by the step each action belongs to)."""
    if last_steps < 1:
        raise ValueError(f"last_steps must be at least 1, got {last_steps}")
    newest = max((e[1].step for events in action_log.values() for e in events), default=0)
    return {key: [e for e in events if e[1].step > newest - last_steps]
            for key, events in action_log.items()}


def _origin(action_log: ActionLog) -> float:
    starts = [e[2] for events in action_log.values() for e in events]
    return min(starts) if starts else 0.0


# ------------------------------------------------------------------------------------------------
# Chrome trace


def chrome_trace(action_log: ActionLog) -> dict[str, Any]:
    """The action log as a Trace Event Format object (``{"traceEvents": [...]}``).

    Every action is a complete event (``"ph": "X"``) with ``ts``/``dur`` in microseconds from the
    earliest action of the log, named by its label, ``cat`` its category (compute, comm, wait)
    and ``args`` its parsed fields (step, microbatch, version, peer where they apply) plus its
    position ``seq`` in the replica's log. Stage ``s`` is process ``s + 1`` named "stage s",
    replica ``r`` its thread ``r + 1`` named "stage s replica r" (pid 0 is the kernel's to
    Perfetto, so numbering starts at 1). ``otherData.t0_unix_s`` keeps the wall-clock origin.
    """
    t0 = _origin(action_log)
    events: list[dict[str, Any]] = []
    for s in sorted({s for s, _ in action_log}):
        events.append({"name": "process_name", "ph": "M", "pid": s + 1,
                       "args": {"name": f"stage {s}"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": s + 1,
                       "args": {"sort_index": s}})
    for (s, r), log in sorted(action_log.items()):
        pid, tid = s + 1, r + 1
        events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                       "args": {"name": f"stage {s} replica {r}"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid,
                       "args": {"sort_index": r}})
        for seq, (category, a, start, end) in enumerate(log):
            args: dict[str, Any] = {"stage": s, "replica": r, "seq": seq, "step": a.step}
            if a.microbatch >= 0:
                args["microbatch"] = a.microbatch
            if a.version >= 0:
                args["version"] = a.version
            if a.peer is not None:
                args["peer"] = a.peer
            events.append({"name": str(a), "cat": category, "ph": "X", "pid": pid, "tid": tid,
                           "ts": round((start - t0) * 1e6, 3),
                           "dur": round(max(0.0, end - start) * 1e6, 3),
                           "args": args})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"t0_unix_s": t0, "source": "pd2bw_ray action log"}}


def write_chrome_trace(action_log: ActionLog, path: str | Path) -> Path:
    """Write ``chrome_trace(action_log)`` as JSON to ``path`` (open it in ui.perfetto.dev or
    chrome://tracing) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(action_log)))
    return path


# ------------------------------------------------------------------------------------------------
# Pictures


def _figure(width_in: float, height_in: float):
    # A bare Figure renders with Agg and leaves pyplot's global backend and figure list alone
    # (a notebook's inline plots keep working, nothing leaks when a figure is not closed).
    from matplotlib.figure import Figure
    return Figure(figsize=(width_in, height_in), layout="constrained")


def _microbatch_color(number: int) -> tuple[float, float, float]:
    """Colour of the microbatch numbered ``number`` (1-based): tab20's ten strong shades, then
    its ten light ones, so neighbours differ."""
    from matplotlib import colormaps
    n = number - 1
    return tuple(colormaps["tab20"]((2 * n) % 20 + (n // 10) % 2)[:3])


def _darker(rgb: Sequence[float], factor: float = 0.6) -> tuple[float, float, float]:
    return (rgb[0] * factor, rgb[1] * factor, rgb[2] * factor)


def _text_color(rgb: Sequence[float]) -> str:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return "black" if luminance > 0.5 else "white"


def draw_timeline(action_log: ActionLog, path: str | Path, *, title: str | None = None,
                  dpi: int = 120) -> Path:
    """Draw the action log as a pipeline timeline PNG and return its path.

    As in the PipeDream-2BW paper's figures: one row per stage replica (stage 0 on top), time
    on x; each microbatch has its own colour, its forward a light box and its backward a darker,
    hatched box of the same colour (a split backward: its ``I`` hatched, its ``W`` dotted), all
    labelled with the microbatch's number in the call
    (1, 2, ... in forward order, like the paper; microbatch ``i`` of step ``t`` is
    ``(t - first step) * m + i + 1``). Updates are black boxes with a marker and the version they
    create; sends and reductions are thin tan bars, waits for a peer light grey.
    """
    from matplotlib.patches import Patch

    t0 = _origin(action_log)
    rows = sorted(action_log)
    parsed = {key: [(cat, a, start - t0, end - t0) for cat, a, start, end in action_log[key]]
              for key in rows}
    compute = [a for evs in parsed.values() for _, a, _, _ in evs if a.kind in _HATCH]
    m = max((a.microbatch for a in compute), default=0) + 1
    first = min((a.step for a in compute), default=0)
    span = max((e[3] for evs in parsed.values() for e in evs), default=0.0) or 1.0

    per_row = max((sum(a.kind in _HATCH for _, a, _, _ in evs)
                   for evs in parsed.values()), default=0)
    width_in = min(40.0, max(8.0, 0.3 * per_row))
    height_in = 1.6 + 0.55 * max(1, len(rows))
    fig = _figure(width_in, height_in)
    ax = fig.subplots()
    px_per_s = width_in * dpi * 0.8 / span   # about: the axes take ~80% of the width

    for y, key in enumerate(rows):
        update_labels: list[tuple[float, list[int]]] = []   # (x, versions) of update markers
        for _, a, start, end in parsed[key]:
            dur = max(end - start, 0.0)
            if a.kind in _HATCH:
                number = (a.step - first) * m + a.microbatch + 1
                base = _microbatch_color(number)
                forward = a.kind is Kind.FORWARD
                face = base if forward else _darker(base)
                ax.broken_barh([(start, dur)], (y - 0.4, 0.8), facecolors=[face],
                               edgecolors="black", linewidth=0.4, hatch=_HATCH[a.kind])
                if dur * px_per_s >= 7 * len(str(number)):
                    ax.text(start + dur / 2, y, str(number), ha="center", va="center",
                            fontsize=7, color=_text_color(face), clip_on=True,
                            bbox=None if forward else dict(boxstyle="square,pad=0.05",
                                                           facecolor=face, linewidth=0))
            elif a.kind is Kind.UPDATE:
                ax.broken_barh([(start, dur)], (y - 0.4, 0.8), facecolors=["black"])
                ax.plot([start], [y - 0.48], marker="v", color="black", markersize=4)
                if update_labels and (start - update_labels[-1][0]) * px_per_s < 16:
                    update_labels[-1][1].append(a.version)   # back to back (the drain): one label
                else:
                    update_labels.append((start, [a.version]))
            elif a.kind in (Kind.RECV_ACT, Kind.RECV_GRAD):
                ax.broken_barh([(start, dur)], (y - 0.4, 0.8), facecolors=["#dddddd"])
            else:   # sends and the reduction (communication issued by this replica)
                ax.broken_barh([(start, dur)], (y + 0.25, 0.15), facecolors=["#c8a165"])
        for x, versions in update_labels:
            ax.text(x, y - 0.5, ",".join(f"v{v}" for v in versions), ha="center", va="bottom",
                    fontsize=6)

    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"stage {s} replica {r}" for s, r in rows])
    ax.set_ylim(len(rows) - 0.4, -0.75)   # stage 0 on top, room for the update labels
    ax.set_xlim(0, span)
    ax.set_xlabel("time (s)")
    ax.set_title(title or "pipeline timeline (numbers: microbatches in forward order)")
    legend = [Patch(facecolor=_microbatch_color(1), edgecolor="black", label="forward"),
              Patch(facecolor=_darker(_microbatch_color(1)), hatch="//", edgecolor="black",
                    label="backward"),
              Patch(facecolor="black", label="update"),
              Patch(facecolor="#c8a165", label="send / reduce"),
              Patch(facecolor="#dddddd", label="wait for peer")]
    fig.legend(handles=legend,
               loc="outside lower center", ncol=5, fontsize=8, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def read_train_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``train_log.jsonl`` (``{"step", "loss", "lr", "time"}`` per line), one
    per step in step order; a step logged twice (a run resumed from an earlier checkpoint)
    keeps its newest record."""
    by_step: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                by_step[int(rec["step"])] = rec
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a train log record "
                                 f"({{\"step\": ..., \"loss\": ...}}): {e}") from e
    return [by_step[s] for s in sorted(by_step)]


def draw_loss_curve(losses: Sequence[float] | Mapping[int, float] | str | Path,
                    path: str | Path, *, lrs: Sequence[float | None] | None = None,
                    first_step: int = 0, title: str | None = None, dpi: int = 120) -> Path:
    """Plot the loss per step (and the learning rate, on a second axis, when known) to a PNG.

    ``losses`` is a list (step ``first_step + i``, e.g. what ``trainer.train`` returns), a
    ``{step: loss}`` mapping, or the path of a ``train_log.jsonl`` (its ``lr`` field is used
    when ``lrs`` is not given). With 20 or more steps a running mean over ~5% of them is drawn
    over the raw curve. Returns the path.
    """
    if isinstance(losses, (str, Path)):
        records = read_train_log(losses)
        steps = [int(r["step"]) for r in records]
        values = [float(r["loss"]) for r in records]
        if lrs is None:
            lrs = [r.get("lr") for r in records]
    elif isinstance(losses, Mapping):
        steps = sorted(int(k) for k in losses)
        values = [float(losses[k]) for k in steps]
    else:
        values = [float(v) for v in losses]
        steps = list(range(first_step, first_step + len(values)))
    if lrs is not None and len(lrs) != len(values):
        raise ValueError(f"lrs has {len(lrs)} entries for {len(values)} losses")

    fig = _figure(8, 4.5)
    ax = fig.subplots()
    ax.plot(steps, values, color="#1f77b4", linewidth=1, alpha=0.5 if len(values) >= 20 else 1,
            label="loss")
    if len(values) >= 20:
        k = max(2, len(values) // 20)
        mean = _running_mean(values, k)
        ax.plot(steps, mean, color="#1f77b4", linewidth=2, label=f"loss, mean of {k}")
    ax.set_xlabel("step (weight update)")
    ax.set_ylabel("loss")
    handles, labels = ax.get_legend_handles_labels()
    known = [(s, lr) for s, lr in zip(steps, lrs or []) if lr is not None]
    if known:
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in known], [lr for _, lr in known], color="#ff7f0e", linewidth=1,
                 drawstyle="steps-post", label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    if values and all(math.isfinite(v) for v in values):
        ax.set_title(title or f"loss {values[0]:.3f} -> {values[-1]:.3f} over "
                              f"{len(values)} steps")
    else:
        ax.set_title(title or "loss")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _running_mean(values: Iterable[float], k: int) -> list[float]:
    out, window, total = [], [], 0.0
    for v in values:
        window.append(v)
        total += v
        if len(window) > k:
            total -= window.pop(0)
        out.append(total / len(window))
    return out
