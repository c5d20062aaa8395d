"""What a long verb tells the person running it: one start line, progress, one end line.

Start lines and progress go to stderr, the end line to stdout. On a terminal the progress is a tqdm
bar with its ETA; in a log (stderr not a terminal) it is a plain line at each quarter of the work,
never tqdm's carriage-return refreshes. `--quiet` leaves only errors and the end line.
"""

from __future__ import annotations

import argparse
import sys
import time


def where() -> str:
    """Where MLX computes here: the device and the BLAS behind its CPU matmuls."""
    import mlx.core as mx  # here, not at the top: an endpoint eval never loads MLX

    from lfm_mlx import cpu_blas

    return f"{mx.default_device()} (BLAS: {cpu_blas.describe()})"


def machine_gb() -> float:
    """This machine's physical memory in GB (1e9 bytes, as lfm_mlx.memory counts)."""
    import psutil

    return psutil.virtual_memory().total / 1e9


def say(verb: str, text: str, quiet: bool = False) -> None:
    """A status line (start, phase) on stderr, unless quiet."""
    if not quiet:
        print(f"lfm-mlx {verb}: {text}", file=sys.stderr, flush=True)


_WARNED: set[str] = set()


def deprecated(topic: str, text: str) -> None:
    """One line on stderr about an old spelling (`topic`: what was renamed), once per process and topic."""
    if topic not in _WARNED:
        _WARNED.add(topic)
        print(f"lfm-mlx: warning: {text}", file=sys.stderr, flush=True)


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print only errors and the final line (no start line, no progress)")


class Lines:
    """tqdm's update / set_postfix / close for a log: a line at each quarter of the work, with the
    elapsed time and an ETA."""

    def __init__(self, verb: str, total: int, unit: str, initial: int = 0, marks: int = 4):
        self.verb, self.total, self.unit, self.marks = verb, total, unit, marks
        self.n = self.first = initial
        self.shown = initial * marks // total if total else marks
        self.postfix, self.started = "", time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        mark = self.n * self.marks // self.total if self.total else 0
        if mark <= self.shown:
            return
        self.shown = mark
        elapsed = time.monotonic() - self.started
        rate = (self.n - self.first) / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {(self.total - self.n) / rate:.0f} s" if rate and self.n < self.total else ""
        postfix = f"; {self.postfix}" if self.postfix else ""
        say(self.verb, f"{100 * self.n / self.total:.0f}% ({self.n}/{self.total} {self.unit}s, {elapsed:.0f} s"
                       f"{eta}){postfix}")

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **values) -> None:
        values = {**(ordered_dict or {}), **values}
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items() if v is not None)

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def close(self) -> None:
        pass


def progress(verb: str, total: int, unit: str, initial: int = 0, show: bool = True, marks: int = 4):
    """A tqdm bar on a terminal, `Lines` in a log (a line at each 1/marks of the work), nothing when not
    shown (each has update, set_postfix, set_postfix_str and close)."""
    from tqdm import tqdm

    if not show or total <= 0:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=verb, unit=unit, dynamic_ncols=True, file=sys.stderr)
    return Lines(verb, total, unit, initial, marks)
