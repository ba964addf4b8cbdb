"""Peak memory of a block of code, on CPU or CUDA.

CUDA: the caching allocator's peak of allocated bytes above what was
allocated at entry. CPU: the process's peak resident set (Linux ``VmHWM``,
reset at entry through ``/proc/self/clear_refs``) above the resident set at
entry. For CPU numbers run each case in a fresh process, with glibc's dynamic
mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_``, as ``metarl bench`` does) so
that freed memory goes back to the system instead of being cached.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Peak:
    mb: float = float("nan")


@contextlib.contextmanager
def peak_memory(device: torch.device | str = "cpu") -> Iterator[Peak]:
    """``with peak_memory(dev) as p: ...`` then ``p.mb`` is the peak in MiB above entry (NaN if unknown)."""
    result = Peak()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        yield result
        torch.cuda.synchronize(dev)
        result.mb = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
        return
    base = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    yield result
    hwm = _status_kb("VmHWM")
    if reset and base is not None and hwm is not None:
        result.mb = max(hwm - base, 0) / 1024
