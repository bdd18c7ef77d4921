"""PNG plots for the benchmark scripts (scripts/bench, scripts/bench-upload), written next to
their text report: grouped bars (throughput per stack, MB per CPU-second) and memory over time.

matplotlib comes with scripts/setup; without it a script still prints its figures and says
that no plot was written.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from procstat import rss_kib


def pyplot():
    """matplotlib.pyplot on the file-only backend, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


class Report:
    """Copies what the script prints to `out/report.txt`, so the plots sit beside the text they
    were drawn from."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.file = open(out / "report.txt", "w", encoding="utf-8")
        self.stdout = sys.stdout

    def write(self, s: str) -> int:
        self.file.write(s)
        return self.stdout.write(s)

    def flush(self) -> None:
        self.file.flush()
        self.stdout.flush()

    def __enter__(self) -> "Report":
        sys.stdout = self
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout = self.stdout
        self.file.close()


class Timeline(threading.Thread):
    """Resident memory of named processes over the whole run (every `every` seconds), and the
    phases of the run (`mark`), for a memory-over-time plot."""

    def __init__(self, pids: Dict[str, Optional[int]], every: float = 0.25):
        super().__init__(daemon=True)
        self.pids = {n: p for n, p in pids.items() if p}
        self.every = every
        self.t0 = time.monotonic()
        self.samples: List[Tuple[float, Dict[str, float]]] = []
        self.marks: List[Tuple[float, str]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            t = time.monotonic() - self.t0
            self.samples.append((t, {n: rss_kib(p) / 1024 for n, p in self.pids.items()}))
            self.done.wait(self.every)

    def mark(self, label: str) -> None:
        self.marks.append((time.monotonic() - self.t0, label))

    def __enter__(self) -> "Timeline":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()


def bars(path: Path, title: str, ylabel: str, groups: Dict[str, Dict[str, float]],
         note: str = "") -> Optional[Path]:
    """A grouped bar chart: one group per key of `groups`, one bar per series within it (the
    same series in the same colour in every group), each bar labelled with its value."""
    plt = pyplot()
    if plt is None or not groups:
        return None
    series: List[str] = []
    for g in groups.values():
        series += [s for s in g if s not in series]
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    for i, s in enumerate(series):
        xs = [k + (i - (len(series) - 1) / 2) * width for k, g in enumerate(groups.values())
              if s in g]
        ys = [g[s] for g in groups.values() if s in g]
        drawn = ax.bar(xs, ys, width, label=s)
        ax.bar_label(drawn, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def memory(path: Path, title: str, timeline: Timeline, note: str = "") -> Optional[Path]:
    """Each process's resident memory over the run, the phases as labelled dotted lines."""
    plt = pyplot()
    if plt is None or not timeline.samples:
        return None
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    for name in timeline.pids:
        pts = [(t, v[name]) for t, v in timeline.samples if v.get(name)]
        ax.plot([t for t, _ in pts], [m for _, m in pts], lw=1, label=name)
    top = max((m for _, v in timeline.samples for m in v.values()), default=0)
    for t, label in timeline.marks:
        ax.axvline(t, color="grey", lw=0.6, ls=":")
        # Inside the axes, along the line's foot: the curves run above.
        ax.text(t, top * 0.02, label, rotation=90, fontsize=6, va="bottom", ha="right")
    ax.set_xlabel("seconds")
    ax.set_ylabel("Envoy RSS (MiB)")
    ax.set_ylim(bottom=0, top=top * 1.15 if top else None)
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def written(paths: List[Optional[Path]]) -> str:
    """The line a script prints about its plots."""
    done = [str(p) for p in paths if p]
    return ("plots: " + ", ".join(done) if done
            else "plots: not written (matplotlib missing: scripts/setup installs it)")
