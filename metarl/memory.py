"""Peak memory of a block of code, on CPU or CUDA: the peak of live tensor bytes.

CUDA: the caching allocator's peak of allocated bytes above what was allocated
at entry (``torch.cuda.max_memory_allocated``). CPU: the same quantity, measured
exactly by a dispatch mode that sees every tensor an operation creates (forward
and backward, so autograd's saved tensors count) and frees its bytes when the
storage dies. Process RSS was tried first: its page and allocator noise (about
0.5 MB) is larger than a first-order meta-gradient's whole working set on small
models. The dispatch mode slows the measured block down: time separately.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass
class Peak:
    mb: float = float("nan")


class _LiveBytes(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch: unannotated
    """Counts the bytes of CPU tensor storages created inside the mode while they live."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch: unannotated
        self.current = 0
        self.peak = 0
        self._live: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.current -= nbytes
        self._live.discard(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._live:
                    nbytes = storage.nbytes()
                    self._live.add(key)
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key, nbytes)
        return out


@contextlib.contextmanager
def peak_memory(device: torch.device | str = "cpu") -> Iterator[Peak]:
    """``with peak_memory(dev) as p: ...`` then ``p.mb`` is the peak in MiB of tensor memory
    allocated inside the block (above what was allocated at entry)."""
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
    mode = _LiveBytes()
    with mode:
        yield result
    result.mb = mode.peak / 2**20
