"""notebooks/interactive_driver.ipynb runs top to bottom in a real Jupyter kernel (this
interpreter's), leaves no Ray process behind, and resumes at the step it checkpointed."""

import ast
import contextlib
import math
import os
import sys
import time

import nbformat
import psutil
from nbclient import NotebookClient
from PIL import Image

from conftest import ROOT

NOTEBOOK = os.path.join(ROOT, "notebooks", "interactive_driver.ipynb")


def descendants(pid: int) -> dict[int, str]:
    try:
        return {p.pid: p.name() for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return {}


def outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out and "text/plain" in out["data"]:
            parts.append(out["data"]["text/plain"])
    return "\n".join(parts)


def test_notebook_runs_in_a_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("PD2BW_NOTEBOOK_OUT", str(tmp_path))   # the kernel inherits it
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}})
    seen: dict[int, str] = {}   # every process the kernel started (Ray's among them)
    t0 = time.time()
    with client.setup_kernel(cwd=ROOT):
        km = client.km
        assert km.format_kernel_cmd()[0] == sys.executable
        kernel = psutil.Process(km.provisioner.pid)
        try:
            for index, cell in enumerate(nb.cells):
                client.execute_cell(cell, index)   # raises CellExecutionError on an error
                seen.update(descendants(kernel.pid))
        finally:
            # whatever happened, stop the kernel's Ray before the kernel goes
            with contextlib.suppress(Exception):
                client.execute_cell(nbformat.v4.new_code_cell("import ray; ray.shutdown()"),
                                    len(nb.cells))
        elapsed = time.time() - t0
        assert any("raylet" in name for name in seen.values()), seen
        # the last cell shut Ray down: its processes exit (workers may take a moment)
        _, alive = psutil.wait_procs([p for p in map(_process, seen) if p], timeout=20)
        assert not alive, [(p.pid, p.name()) for p in alive]
    # setup_kernel stopped the kernel
    assert not kernel.is_running() or kernel.status() == psutil.STATUS_ZOMBIE

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(o["output_type"] != "error" for c in code for o in c.get("outputs", []))
    summary_cell = next(c for c in code if "summary" in c.metadata.get("tags", []))
    summary = ast.literal_eval(summary_cell.outputs[-1]["data"]["text/plain"])
    assert summary["step_before_checkpoint"] == 8
    assert summary["step_resumed"] == 8
    assert summary["step_now"] == 12 and summary["num_losses"] == 12
    assert summary["lr_before"] == 1e-3 and summary["lr_after"] == 3e-4
    assert summary["lr_resumed"] == 3e-4   # the checkpoint kept the learning rate we set
    # random tokens: the loss of a uniform guess, ln(vocab) for MLM + ln 2 for NSP
    for loss in (summary["first_loss"], summary["last_loss"]):
        assert abs(loss - (math.log(1200) + math.log(2))) < 0.3, summary
    assert outputs_text(code[-1]).strip() == "False"   # ray.is_initialized() after shutdown
    images = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 3   # two loss curves and the timeline
    for name in ("loss_curve.png", "timeline.png"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG" and img.width >= 600
    assert (tmp_path / "timeline.json").stat().st_size > 1000
    progress = outputs_text(code[3])    # the progress bar of train(..., progress=True)
    assert "4/4" in progress and "samples/s" in progress and "loss" in progress, progress
    assert [int(p.name.split("-")[1]) for p in (tmp_path / "checkpoints").glob("step-*")] == [8]
    print(f"notebook ran in {elapsed:.1f} s")


def _process(pid: int):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None
