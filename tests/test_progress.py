"""The progress display: plain lines in a log, a redrawn bar in a terminal."""

import io
import re

import pytest

from pd2bw_ray.progress import ProgressBar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_in_a_log_every_n_steps_and_the_last():
    out = io.StringIO()
    bar = ProgressBar(7, first=10, samples_per_step=32, every=3, desc="pretrain", file=out)
    assert bar.mode == "lines"      # a StringIO is no terminal, as `ray job logs` is not
    for step in range(10, 17):
        bar.update(step, 5.0 - 0.1 * step, extra="lr 1.00e-04")
    bar.close()
    lines = out.getvalue().splitlines()
    assert [re.match(r"\[pretrain\] step (\d+)/17 ", x)[1] for x in lines] == ["13", "16", "17"]
    assert "\r" not in out.getvalue()
    last = lines[-1]
    assert "loss 3.4000" in last and "lr 1.00e-04" in last
    rate = float(re.search(r"([\d.]+) samples/s", last)[1])
    assert rate > 0
    assert re.search(r"ETA 00:00:00$", last)


def test_a_bar_redrawn_in_place_in_a_terminal():
    out = Terminal()
    bar = ProgressBar(4, samples_per_step=8, file=out)
    assert bar.mode == "bar"
    for step in range(4):
        bar.update(step, 2.5)
    bar.close()
    text = out.getvalue()
    assert "\r" in text and "4/4" in text and "loss=2.5000" in text and "samples/s=" in text


def test_unknown_total_and_samples():
    out = io.StringIO()
    bar = ProgressBar(None, every=1, file=out)
    bar.update(0, 1.0)
    assert out.getvalue().strip() == "[train] step 1 loss 1.0000"


def test_bad_mode():
    with pytest.raises(ValueError, match="progress mode 'fancy'"):
        ProgressBar(3, mode="fancy")
