"""A training progress display: steps, samples/s, loss and ETA, wherever the driver's output goes.

- In a terminal: a live tqdm bar, redrawn in place.
- In a notebook: tqdm's notebook bar (``tqdm.auto``; a text bar where ipywidgets is missing).
- In a file or pipe (``ray job logs``, CI, ``> log``): a carriage-return bar would turn into one
  endless line there, so it prints a plain line every ``every`` steps instead (and the last one).
"""

from __future__ import annotations

import sys
import time
from typing import IO, Callable


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class ProgressBar:
    """Progress of ``total`` weight updates (None: unknown), each of ``samples_per_step``
    samples (None: unknown, samples/s is not shown). ``update(step, loss)`` after each update
    (``step`` counts from ``first``); ``close()`` at the end."""

    def __init__(self, total: int | None, *, first: int = 0, samples_per_step: int | None = None,
                 every: int = 10, desc: str = "train", file: IO[str] | None = None,
                 mode: str | None = None, line: Callable[[str], None] | None = None):
        self.total, self.first, self.samples = total, first, samples_per_step
        self.every = max(1, every)
        self.desc = desc
        self.file = file if file is not None else sys.stderr
        self.line = line or (lambda text: print(text, file=self.file, flush=True))
        if mode is None:
            mode = ("notebook" if _in_notebook()
                    else "bar" if getattr(self.file, "isatty", lambda: False)() else "lines")
        if mode not in ("bar", "notebook", "lines"):
            raise ValueError(f"progress mode {mode!r}: use 'bar', 'notebook' or 'lines'")
        self.mode = mode
        self.t0 = time.time()
        self.done = 0
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=desc, unit="step", file=self.file,
                             dynamic_ncols=True)
        elif mode == "notebook":
            try:    # a widget where ipywidgets is installed, else a text bar the page redraws
                import ipywidgets  # noqa: F401
                from tqdm.notebook import tqdm as notebook_tqdm
                self._bar = notebook_tqdm(total=total, desc=desc, unit="step")
            except ImportError:
                from tqdm import tqdm
                self._bar = tqdm(total=total, desc=desc, unit="step", file=self.file)

    def rate(self) -> float | None:
        """Samples per second since the start (None when the samples per step are unknown)."""
        elapsed = time.time() - self.t0
        if self.samples is None or elapsed <= 0:
            return None
        return self.done * self.samples / elapsed

    def eta_s(self) -> float | None:
        elapsed = time.time() - self.t0
        if self.total is None or not self.done:
            return None
        return max(0, self.total - self.done) * elapsed / self.done

    def text(self, step: int, loss: float, extra: str = "") -> str:
        """The plain progress line for ``step`` (0-based, absolute)."""
        of = f"/{self.first + self.total}" if self.total is not None else ""
        rate = self.rate()
        eta = self.eta_s()
        parts = [f"[{self.desc}] step {step + 1}{of}", f"loss {loss:.4f}"]
        if extra:
            parts.append(extra)
        if rate is not None:
            parts.append(f"{rate:.1f} samples/s")
        if eta is not None:
            parts.append(f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
        return " ".join(parts)

    def update(self, step: int, loss: float, extra: str = "") -> None:
        self.done += 1
        if self._bar is not None:
            post = {"loss": f"{loss:.4f}"}
            rate = self.rate()
            if rate is not None:
                post["samples/s"] = f"{rate:.1f}"
            if extra:
                post["info"] = extra
            self._bar.set_postfix(post, refresh=False)
            self._bar.update(1)
        elif self.done % self.every == 0 or (self.total is not None and self.done == self.total):
            self.line(self.text(step, loss, extra))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
