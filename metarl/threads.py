"""How many torch CPU threads to use: the default policy (``--threads`` not given).

torch starts one intra-op thread per core and its parallel regions end in a barrier,
so when another process holds a core, every barrier waits for the thread the OS has
parked: on a 2-core machine with the other core busy, sinusoid MAML at torch's default
thread count ran 8x slower than a plain per-task loop, and 13x faster with one thread.
The policy here: use the CPUs that other processes leave idle, measured, and measure
again as the run goes.

- CPUs: those this process may run on (``sched_getaffinity``), at most torch's own
  default (one per physical core) and a cgroup CPU quota if there is one.
- Others' load: the busy time of those CPUs in ``/proc/stat`` over a window, less this
  process's own CPU time and that of its live ``multiprocessing`` children (the
  environment workers). Threads = the CPUs left, counting a CPU as free only when
  others use less than ``SLACK`` of one; never fewer than one.
- The first choice measures a short window (``FIRST_WINDOW``); ``tick()`` between
  iterations re-measures the time since the previous choice once it is at least
  ``WINDOW`` long, so a job that starts or ends beside a long training run changes
  the thread count at the next iteration.
- Without ``/proc/stat`` (not Linux) the load is the one-minute load average less
  this process's share, a slower signal.

A changing thread count can change the last bits of float sums (parallel reductions
split differently): pass ``--threads N`` (or ``METARL_THREADS=N``) where a run must be
reproducible bit for bit; the distributed launcher passes a fixed count to its ranks.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

SLACK = 0.2
"""A CPU counts as free when other processes use less than this share of it."""
FIRST_WINDOW = 0.2
"""Seconds of the first load measurement."""
WINDOW = 2.0
"""Seconds at least between two re-measurements by ``tick()``."""

TORCH_DEFAULT = torch.get_num_threads()
"""torch's own thread count, read before anything here changes it."""


def usable_cpus() -> int:
    """CPUs this process may use: its affinity, torch's default and a cgroup quota."""
    n = len(_affinity()) or (os.cpu_count() or 1)
    n = min(n, TORCH_DEFAULT)
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.floor(quota + SLACK)))
    return max(1, n)


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set()


def _cgroup_quota() -> float | None:
    """CPUs of the cgroup v2 quota (``cpu.max``: ``QUOTA PERIOD``), None without one."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def _clock_ticks() -> int:
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100


def busy_seconds(cpus: set[int], stat: str | None = None) -> float | None:
    """Busy seconds of ``cpus`` since boot from ``/proc/stat`` (all CPUs when the set is
    empty); None where there is no ``/proc/stat``. Busy is everything but idle and
    iowait, steal included (a hypervisor's other guests hold the CPU too)."""
    if stat is None:
        try:
            stat = Path("/proc/stat").read_text()
        except OSError:
            return None
    total = 0
    found = False
    for line in stat.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        if cpus and int(name[3:]) not in cpus:
            continue
        v = [int(x) for x in rest.split()]
        # user nice system idle iowait irq softirq steal (guest is already in user)
        total += sum(v[:8]) - v[3] - v[4]
        found = True
    return total / _clock_ticks() if found else None


def own_seconds() -> float:
    """CPU seconds of this process and of its live multiprocessing children."""
    s = time.process_time()
    ticks = _clock_ticks()
    for child in multiprocessing.active_children():
        try:
            fields = Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()
            s += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        except (OSError, ValueError, IndexError):
            continue
    return s


def choose(cpus: int, others: float) -> int:
    """Threads for ``cpus`` usable CPUs when other processes keep ``others`` CPUs busy."""
    return max(1, min(cpus, math.floor(cpus - others + SLACK)))


@dataclass
class Governor:
    """The automatic thread count: ``update()`` measures others' load and sets torch's
    thread count. ``clock``, ``busy`` and ``own`` are injectable for tests."""

    cpus: int = field(default_factory=usable_cpus)
    clock: Callable[[], float] = time.monotonic
    busy: Callable[[], float | None] = field(default=lambda: busy_seconds(_affinity()))
    own: Callable[[], float] = own_seconds
    threads: int = 0
    others: float = 0.0
    history: list[int] = field(default_factory=list)
    """The count chosen at each measurement."""
    _last: tuple[float, float | None, float] | None = None

    def _sample(self) -> tuple[float, float | None, float]:
        return self.clock(), self.busy(), self.own()

    def start(self, window: float = FIRST_WINDOW,
              sleep: Callable[[float], None] = time.sleep) -> int:
        """The first choice, from a ``window``-second measurement (this process idle)."""
        self._last = self._sample()
        if self.cpus > 1:
            sleep(window)
        return self.update(force=True)

    def update(self, *, force: bool = False) -> int:
        """Re-measure since the last measurement (if ``WINDOW`` has passed, or ``force``)
        and set torch's thread count; returns it."""
        if not force and self._last is not None and self.clock() - self._last[0] < WINDOW:
            return self.threads  # cheap: the clock only
        now = self._sample()
        if self._last is None:
            self._last = now
        if self.cpus == 1:
            threads = 1
        else:
            self.others = self._others(self._last, now)
            threads = choose(self.cpus, self.others)
        self._last = now
        self.history.append(threads)
        if threads != self.threads:
            torch.set_num_threads(threads)
            self.threads = threads
        return threads

    def _others(self, a: tuple[float, float | None, float],
                b: tuple[float, float | None, float]) -> float:
        wall = b[0] - a[0]
        if a[1] is not None and b[1] is not None and wall > 0:
            return max(0.0, (b[1] - a[1] - (b[2] - a[2])) / wall)
        try:  # no /proc/stat: the one-minute load average, less this process's recent share
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0
        mine = (b[2] - a[2]) / wall if wall > 0 else 0.0
        return max(0.0, load - mine)


_governor: Governor | None = None


def use(n: int | None) -> int:
    """Set torch's thread count: ``n`` fixed, or (None) the automatic policy, which
    ``tick()`` then keeps up to date. Returns the count now in use."""
    global _governor
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        _governor = None
        torch.set_num_threads(n)
        return n
    _governor = Governor()
    return _governor.start()


def tick() -> int:
    """Between iterations of long work: re-measure under the automatic policy (at most
    every ``WINDOW`` seconds; a no-op with a fixed count). Returns the count in use."""
    if _governor is None:
        return torch.get_num_threads()
    return _governor.update()


def current() -> Governor | None:
    """The automatic policy in use, or None when the count is fixed."""
    return _governor
