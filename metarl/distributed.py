"""Data-parallel meta-training over tasks on ``torch.distributed``.

The meta-batch is the unit that is split: tasks are independent until their
meta-gradients are averaged. Every rank draws the same T tasks from the shared
seed and keeps a contiguous share of them (:meth:`Group.share`), samples its own
trajectories with its own environments and computes its part of every task
mean. What is global is reduced: the meta-gradient, every Fisher-vector product
of TRPO's conjugate gradient, its ``s^T F s`` and the line search's loss and KL
of each candidate are gathered as per-task rows and averaged in task order
(:meth:`Group.ordered_mean`), so that N processes compute what one process does
to the last bit and every rank takes the same step; the logged metrics are
all-reduced as ``sum_r n_r mean_r / T`` (:meth:`Group.task_mean`). Per-task work
(inner steps, baseline fits, iMAML's per-task CG) stays local. There is no DDP
wrapper: its hooks assume one set of parameters, not one per task.

A single process is the group of one (:data:`LOCAL`), whose reductions return
their input unchanged, so the same code runs with and without a launcher.
Processes are started by PyTorch's elastic launcher (``metarl train --procs
N`` on one machine, or ``torchrun`` across machines), which sets ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init` reads them.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from metarl import params as P
from metarl.types import Params, RunError, UsageError

log = logging.getLogger(__name__)

TIMEOUT_S = 60
"""Seconds a collective waits for a missing rank before the run fails (a rank that
died mid-iteration ends the others within this time, not gloo's 30 minutes)."""


class PeerError(RunError):
    """Another rank failed or disappeared during a collective."""


@dataclass
class Traffic:
    """What this process's collectives (every all-reduce of :meth:`Group._all_reduce` and
    all-gather of :meth:`Group.gather_rows`: every task mean of a training iteration)
    moved: ``calls``, ``bytes`` (the payload, ``numel * element_size`` of each tensor as
    this rank hands it in; a ring all-reduce sends about ``2 (world - 1) / world`` times
    that per rank, an all-gather receives ``world - 1`` times it) and ``seconds`` spent
    inside them (gloo: transfer and waiting for the slowest rank; NCCL returns once the
    collective is queued, so there it is only the launch). A group of one reduces
    nothing and counts nothing. ``metarl bench --section distributed`` reads it per
    iteration."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def count(self, payload: Tensor, seconds: float) -> None:
        self.calls += 1
        self.bytes += payload.numel() * payload.element_size()
        self.seconds += seconds

    def snapshot(self) -> Traffic:
        return Traffic(self.calls, self.bytes, self.seconds)

    def since(self, before: Traffic) -> Traffic:
        """The traffic after ``before`` (a :meth:`snapshot`)."""
        return Traffic(self.calls - before.calls, self.bytes - before.bytes,
                       self.seconds - before.seconds)


TRAFFIC = Traffic()
"""This process's all-reduce counter (see :class:`Traffic`)."""


@dataclass(frozen=True)
class Group:
    """The processes of one run: this one is ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder (config, metrics, checkpoints) and prints."""
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items: sizes differ by at most one, the
        first ``n % world`` ranks taking one more (a rank may get none when n < world)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def task_mean(self, local_mean: Tensor, n_local: int) -> Tensor:
        """The mean over every rank's tasks from this rank's mean over its ``n_local``:
        ``sum_r n_r x_r / sum_r n_r`` in one collective (``x`` itself for one process)."""
        if self.world == 1:
            return local_mean
        flat = local_mean.detach().reshape(-1)
        y = torch.cat([flat * n_local, flat.new_tensor([float(n_local)])])
        y = self._all_reduce(y)
        return (y[:-1] / y[-1]).reshape(local_mean.shape).to(local_mean.device)

    def task_mean_metrics(self, metrics: dict[str, float], n_local: int) -> dict[str, float]:
        """Logged metrics (each a mean over this rank's tasks) as means over all tasks, in
        one collective. Every rank logs the same keys."""
        if self.world == 1 or not metrics:
            return metrics
        keys = sorted(metrics)
        v = self.task_mean(torch.tensor([metrics[k] for k in keys], dtype=torch.float64),
                           n_local)
        return dict(zip(keys, v.tolist()))

    def task_counts(self, n_local: int) -> list[int]:
        """Every rank's number of tasks, in rank order, from this rank's ``n_local`` (one
        small all-gather; no communication for one process)."""
        if self.world == 1:
            return [n_local]
        return [int(c) for c in self.gather_rows(torch.tensor([[n_local]]), [1] * self.world)[:, 0]]

    def ordered_mean(self, rows: Tensor, counts: Sequence[int]) -> Tensor:
        """The mean over every rank's tasks of per-task ``rows`` (``[n_local, ...]``, this
        rank's tasks in task order; ``counts`` from :meth:`task_counts` or :meth:`counts`).

        The rows are gathered and summed in task order, so every rank performs the same
        floating-point operations as one process holding all ``sum(counts)`` rows: the
        result does not depend on how the tasks are split, to the last bit (an all-reduce
        of rank means rounds differently for each split, which TRPO's conjugate gradient
        amplifies by the Fisher's condition number). Costs ``sum(counts)`` rows of traffic
        per rank instead of one.
        """
        whole = self.gather_rows(rows.detach().contiguous(), counts)
        return whole.reshape(whole.shape[0], -1).mean(0).reshape(rows.shape[1:])

    def ordered_mean_params(self, rows: Params, counts: Sequence[int]) -> Params:
        """:meth:`ordered_mean` of per-task parameter stacks (leaves ``[n_local, *shape]``),
        in one collective."""
        n = next(iter(rows.values())).shape[0]
        flat = torch.cat([v.detach().reshape(n, -1) for v in rows.values()], 1)
        like = {k: v[0].detach() for k, v in rows.items()}
        return P.unflatten(self.ordered_mean(flat, counts), like)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (one small all-reduce; ``flag`` itself for
        one process): a decision every rank then takes together."""
        if self.world == 1:
            return flag
        return bool(self._all_reduce(torch.tensor([1.0 if flag else 0.0]))[0] > 0)

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world > 1:
            self._all_reduce(torch.zeros(1))

    def counts(self, n: int) -> list[int]:
        """How many of ``n`` items each rank's :meth:`share` holds, in rank order."""
        return [len(range(n)[Group(rank=r, world=self.world).share(n)])
                for r in range(self.world)]

    def gather_objects(self, items: Sequence[Any]) -> list[Any]:
        """Concatenate each rank's picklable ``items`` in rank order (every rank gets the
        whole list): task specs, not tensors."""
        if self.world == 1:
            return list(items)
        parts: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(parts, list(items))
        except (RuntimeError, dist.DistError) as e:
            raise PeerError(_peer_message(e)) from None
        return [x for part in parts for x in part]

    def gather_rows(self, x: Tensor, counts: Sequence[int]) -> Tensor:
        """Concatenate each rank's ``[counts[r], ...]`` rows in rank order (every rank
        gets the whole)."""
        if self.world == 1:
            return x
        width = max(counts)
        padded = torch.zeros((width, *x.shape[1:]), dtype=x.dtype, device=_comm_device())
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        t0 = time.perf_counter()
        try:
            dist.all_gather(parts, padded)
        except (RuntimeError, dist.DistError) as e:
            raise PeerError(_peer_message(e)) from None
        TRAFFIC.count(padded, time.perf_counter() - t0)
        return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(x.device)

    def _all_reduce(self, x: Tensor) -> Tensor:
        y = x.to(_comm_device()).contiguous()
        t0 = time.perf_counter()
        try:
            dist.all_reduce(y, op=dist.ReduceOp.SUM)
        except (RuntimeError, dist.DistError) as e:  # a peer died or raised
            raise PeerError(_peer_message(e)) from None
        TRAFFIC.count(y, time.perf_counter() - t0)
        return y


def _comm_device() -> torch.device:
    """Where collectives run: the rank's GPU for NCCL, the CPU for gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


PEER_PREFIX = "another rank stopped during a collective"


def _peer_message(e: BaseException) -> str:
    return f"{PEER_PREFIX} (it failed or was killed): " + " ".join(str(e).split())[:160]


LOCAL = Group()
"""The group of one process."""

_current = LOCAL


def current() -> Group:
    """This process's group (:data:`LOCAL` unless :func:`init` joined a launched run)."""
    return _current


def launched() -> bool:
    """Whether this process was started by a launcher as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> Group:
    """Join the run this process was launched into (gloo for CPU tensors, NCCL for CUDA,
    one GPU per local rank); the group of one when it was not launched."""
    global _current
    if not launched():
        return LOCAL
    if _current.world > 1:
        return _current
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    _current = Group(rank=dist.get_rank(), world=dist.get_world_size())
    log.info("rank %d of %d (%s)", _current.rank, _current.world, backend)
    return _current


def local_device(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for a CUDA run, else ``device``."""
    if device.type == "cuda" and launched() and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shutdown() -> None:
    """Leave the process group (no-op for one process)."""
    global _current
    if _current.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _current = LOCAL


def env_rank() -> int:
    """This process's rank as the launcher set it (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


ERRORS_ENV = "METARL_RANK_ERRORS"
"""Folder where a launched rank writes its one-line error (``rank-N``) for the launcher."""


def record_error(message: str) -> bool:
    """In a launched rank, leave ``message`` for the launcher to report and return True;
    elsewhere return False (the caller prints it)."""
    folder = os.environ.get(ERRORS_ENV)
    if not folder or not launched():
        return False
    path = os.path.join(folder, f"rank-{env_rank()}")
    if not os.path.exists(path):  # the first error of a rank is its cause
        with open(path, "w") as f:
            f.write(message)
    return True


def free_port() -> int:
    """A TCP port on this machine that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_port(port: int) -> None:
    """Raise :class:`~metarl.types.UsageError` when ``port`` cannot be listened on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise UsageError(f"port {port} is in use ({e.strerror}): choose another --port, or "
                             "leave it out to take a free one") from None


def launch(args: Sequence[str], procs: int, *, port: int | None = None,
           threads: int | None = None) -> None:
    """Run ``python -m metarl.cli.main ARGS`` as ``procs`` ranks on this machine through
    PyTorch's elastic launcher (what ``torchrun --nproc-per-node`` runs), rendezvous on
    ``127.0.0.1:port`` (a free port when None), no restarts.

    Raises:
        UsageError: a bad ``procs`` or a port in use.
        RunError: a rank failed: the message names the first failing rank and its cause
            (its own error line, or the signal that killed it).
        KeyboardInterrupt: Ctrl-C or SIGTERM to this process (every rank was stopped).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if procs < 1:
        raise UsageError(f"--procs must be >= 1, got {procs}")
    if port is None:
        port = free_port()
    check_port(port)
    errors = tempfile.mkdtemp(prefix="metarl-ranks-")
    env = {ERRORS_ENV: errors, "METARL_THREADS": str(threads or max(1, (os.cpu_count() or 1)
                                                                    // procs))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the ranks inherit this process's environment
    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # the failure is reported below
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=procs,
                          run_id=f"metarl-{os.getpid()}", rdzv_backend="c10d",
                          rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=0,
                          monitor_interval=0.5, start_method="spawn")
    try:
        elastic_launch(config, sys.executable)("-m", "metarl.cli.main", *args)
    except ChildFailedError as e:
        raise RunError(_failure(e, errors)) from None
    except SignalException:
        raise KeyboardInterrupt from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(errors, ignore_errors=True)


def _failure(e: Any, errors: str) -> str:
    """One line: the first rank that failed (by time) and why."""
    failures = getattr(e, "failures", {}) or {}
    written: dict[int, str] = {}
    for name in os.listdir(errors):
        if name.startswith("rank-"):
            with open(os.path.join(errors, name)) as f:
                written[int(name.split("-")[1])] = f.read().strip()
    # a rank that raised explains itself; the others only saw it go
    causes = {r: m for r, m in written.items() if not m.startswith(PEER_PREFIX)}
    if causes:
        rank = min(causes)
        return f"rank {rank}: {causes[rank]}"
    killed = {r: f for r, f in failures.items() if f.exitcode is not None and f.exitcode < 0
              and r not in written}
    if killed:
        rank = min(killed, key=lambda r: killed[r].timestamp)
        return f"rank {rank} was killed by {killed[rank].signal_name()}"
    if written:
        rank = min(written)
        return f"rank {rank}: {written[rank]}"
    if not failures:
        return f"a rank failed: {' '.join(str(e).split())[:200]}"
    rank, failure = min(failures.items(), key=lambda kv: kv[1].timestamp)
    return f"rank {rank} exited with code {failure.exitcode}"
