"""What /proc says about a process and the machine, for the benchmarks (scripts/bench,
scripts/bench-upload, scripts/load): resident memory, CPU seconds per process and per Envoy
worker thread, and the machine's CPU time counters. Readings of a process that is gone are 0."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

TICK = os.sysconf("SC_CLK_TCK")


def rss_kib(pid: Optional[int]) -> int:
    """Resident memory of a process, KiB."""
    if not pid:
        return 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_seconds(stat: Path) -> float:
    """user + system time from a /proc .../stat file (fields after the command name)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_cpu(pid: Optional[int]) -> float:
    """CPU seconds (user + system) a process has used so far, all threads."""
    if not pid:
        return 0.0
    try:
        return _cpu_seconds(Path(f"/proc/{pid}/stat"))
    except (OSError, IndexError, ValueError):
        return 0.0


#: The native build's helper threads that hash uploads' ciphertext beside their streams.
HASH_THREAD = "ocicrypt-hash-"


def worker_cpu(pid: Optional[int], main: bool = False) -> Dict[str, float]:
    """CPU seconds each Envoy worker thread (named wrk:worker_N) has used so far; with `main`,
    also Envoy's main thread (the task whose id is the pid), as "main", and the native build's
    hashing helpers together, as "hash"."""
    out: Dict[str, float] = {}
    if not pid:
        return out
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
            if name.startswith("wrk:"):
                out[name] = _cpu_seconds(task / "stat")
            elif main and task.name == str(pid):
                out["main"] = _cpu_seconds(task / "stat")
            elif main and name.startswith(HASH_THREAD):
                out["hash"] = out.get("hash", 0.0) + _cpu_seconds(task / "stat")
        except (OSError, IndexError, ValueError):
            continue
    return out


def busy_shares(before: Dict[str, float], after: Dict[str, float], secs: float) -> List[float]:
    """Each worker's CPU seconds between two `worker_cpu` readings over the wall time, by name."""
    return [(after[k] - before.get(k, 0.0)) / secs for k in sorted(after)]


def cpu_times() -> List[int]:
    """The machine's aggregate CPU time counters (/proc/stat 'cpu' line)."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def idle_share(before: List[int], after: List[int]) -> float:
    """Share of the machine's CPU time left idle (idle + iowait) between two `cpu_times`."""
    delta = [b - a for a, b in zip(before, after)]
    return (delta[3] + delta[4]) / max(1, sum(delta))
