"""More metarl runners for the peer harness (``../shared/bench-peers/peers_bench.py``),
beside its ``metarl_plugin`` (the default batched path):

- ``make_loop_runner``: metarl's per-task loop reference, the "loop" of ``metarl bench``
  (the meta-gradient one task at a time end to end, ``chunk=1``), timed against the
  plain PyTorch loop.
- ``make_chunk16_runner``: the batched path 16 tasks at a time end to end
  (``--task-chunk 16``): the meta-batch's graph in two halves, for the memory.
- ``make_chunk4_runner``: four tasks at a time (``--task-chunk 4``).
- ``make_auto_runner``: what ``metarl train`` runs on Omniglot (``--task-chunk auto``):
  the chunk chosen by timing on the first (warm-up) iteration, then kept.

    peers_bench.py --workloads W3 --impls plain_loop higher \\
        --impl metarl=metarl_plugin:make_runner \\
        --impl metarl_loop=peers_plugins:make_loop_runner \\
        --pythonpath PROJECT --pythonpath PROJECT/scripts --pythonpath .
"""

import json
import os
from typing import Any

import metarl_plugin  # the harness's own plug-in (its folder is on --pythonpath)

from metarl.algorithms import ChunkChooser, meta_grad


def _chunked(spec: Any, chunk: int) -> Any:
    runner = metarl_plugin.make_runner(spec)
    runner._compute = lambda theta, b: meta_grad(runner.algo, theta, b, runner.inner,
                                                 chunk=chunk)
    return runner


def make_loop_runner(spec: Any) -> Any:
    return _chunked(spec, 1)


def make_chunk16_runner(spec: Any) -> Any:
    return _chunked(spec, 16)


def make_chunk4_runner(spec: Any) -> Any:
    return _chunked(spec, 4)


def make_auto_runner(spec: Any) -> Any:
    """The chosen chunk and the candidates' seconds are appended, as a JSON line, to the
    file ``$METARL_PEERS_LOG`` names, if set (the harness keeps no worker output)."""
    runner = metarl_plugin.make_runner(spec)
    chooser = ChunkChooser()

    def compute(theta: Any, b: Any) -> Any:
        first = chooser.chunk is None
        mg = chooser.meta_grad(runner.algo, theta, b, runner.inner)
        if first and os.environ.get("METARL_PEERS_LOG"):
            with open(os.environ["METARL_PEERS_LOG"], "a") as f:
                f.write(json.dumps({"workload": spec.name, "chunk": chooser.chunk,
                                    "seconds": chooser.seconds}) + "\n")
        return mg

    runner._compute = compute
    return runner
