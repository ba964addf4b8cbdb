"""More metarl runners for the peer harness (``../shared/bench-peers/peers_bench.py``),
beside its ``metarl_plugin`` (the default batched path):

- ``make_loop_runner``: metarl's per-task loop reference, the "loop" of ``metarl bench``
  (the meta-gradient one task at a time end to end, ``chunk=1``), timed against the
  plain PyTorch loop.
- ``make_chunk16_runner``: the batched path 16 tasks at a time end to end
  (``--task-chunk 16``): the meta-batch's graph in two halves, for the memory.

    peers_bench.py --workloads W3 --impls plain_loop higher \\
        --impl metarl=metarl_plugin:make_runner \\
        --impl metarl_loop=peers_plugins:make_loop_runner \\
        --pythonpath PROJECT --pythonpath PROJECT/scripts --pythonpath .
"""

from typing import Any

import metarl_plugin  # the harness's own plug-in (its folder is on --pythonpath)

from metarl.algorithms import meta_grad


def _chunked(spec: Any, chunk: int) -> Any:
    runner = metarl_plugin.make_runner(spec)
    runner._compute = lambda theta, b: meta_grad(runner.algo, theta, b, runner.inner,
                                                 chunk=chunk)
    return runner


def make_loop_runner(spec: Any) -> Any:
    return _chunked(spec, 1)


def make_chunk16_runner(spec: Any) -> Any:
    return _chunked(spec, 16)
