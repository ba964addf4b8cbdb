"""learn2learn's Omniglot MAML trained on metarl's own tasks, scored by ``metarl evaluate``.

The side-by-side of the README's Omniglot section: learn2learn's ``OmniglotCNN`` and
``MAML`` wrapper as shipped (its own initialisation: batch-norm scale U(0, 1), eps 1e-5)
train on exactly the meta-batches ``metarl train --seed S`` draws (metarl's loader,
split and task stream), with metarl's Omniglot defaults (meta-batch 32, one inner step
at lr 0.4, second order, Adam 1e-3). The trained weights are written as a metarl run
folder (``bn_eps=1e-5``, learn2learn's epsilon), so ``metarl evaluate`` scores both
libraries on the same test tasks with the same protocol. Run it with the peer
harness's venv (``../shared/bench-peers/setup_peers_venv.sh``)::

    /tmp/peers-venv/bin/python scripts/l2l_omniglot.py --data ../shared/data/omniglot \\
        --seed 11 --iterations 300 --out runs/omni-l2l-s11
    .venv/bin/metarl evaluate runs/omni-l2l-s11 --tasks 300 --steps 3

``--init-from RUN`` starts learn2learn from a metarl checkpoint's weights instead (and
keeps that run's batch-norm options), to tell the engines apart from the initialisations.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT.parent / "shared" / "bench-peers")]
# metarl's own dependencies (gymnasium, ...) from the project's venv, after the peers' own
sys.path += [str(p) for p in (ROOT / ".venv" / "lib").glob("python3*/site-packages")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from metarl import checkpoint  # noqa: E402
from metarl import config as C  # noqa: E402
from metarl.tasks.omniglot import OmniglotFamily  # noqa: E402
from metarl.train import seeds  # noqa: E402


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """learn2learn's conv blocks (conv, normalize), in order."""
    return [m for m in model.modules() if hasattr(m, "conv") and hasattr(m, "normalize")]


def to_metarl(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    theta = {}
    for i, b in enumerate(blocks(model)):
        theta[f"conv{i}.w"], theta[f"conv{i}.b"] = b.conv.weight, b.conv.bias
        theta[f"bn{i}.w"], theta[f"bn{i}.b"] = b.normalize.weight, b.normalize.bias
    theta["head.w"], theta["head.b"] = model.classifier.weight.T, model.classifier.bias
    return {k: v.detach().clone().float() for k, v in theta.items()}


def from_metarl(model: torch.nn.Module, theta: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for i, b in enumerate(blocks(model)):
            b.conv.weight.copy_(theta[f"conv{i}.w"])
            b.conv.bias.copy_(theta[f"conv{i}.b"])
            b.normalize.weight.copy_(theta[f"bn{i}.w"])
            b.normalize.bias.copy_(theta[f"bn{i}.b"])
        model.classifier.weight.copy_(theta["head.w"].T)
        model.classifier.bias.copy_(theta["head.b"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="Omniglot data (as metarl's --data)")
    ap.add_argument("--split", default="character", choices=["character", "alphabet"])
    ap.add_argument("--val-fraction", type=float, default=0.0,
                    help="as metarl's val_fraction: score on held-out meta-train classes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--init-from", help="a metarl run whose initial weights to start from")
    ap.add_argument("--out", required=True, help="the metarl run folder to write")
    a = ap.parse_args()
    from peers_bench import _import_learn2learn

    l2l, _ = _import_learn2learn()
    torch.set_num_threads(1)
    opts = {"data": a.data, "split": a.split, "val_fraction": a.val_fraction, "bn_eps": 1e-5,
            "bn_scale": "uniform"}
    start = None
    if a.init_from:
        start = checkpoint.load(a.init_from)
        opts.update({k: start.config.family_options[k] for k in ("bn_eps", "bn_scale")
                     if k in start.config.family_options})
    fam = OmniglotFamily(**opts)
    cfg = C.resolve(fam, {"family": "omniglot", "family_options": fam.options(),
                          "iterations": a.iterations, "seed": a.seed, "device": "cpu",
                          "log_every": a.log_every})
    torch.manual_seed(a.seed)
    model = l2l.vision.models.OmniglotCNN(fam.ways)
    for b in blocks(model):
        b.normalize.eps = fam.bn_eps
    if start is not None:  # the initial weights that run was trained from
        from_metarl(model, fam.init_params(seeds(start.config.seed)[0], torch.device("cpu"),
                                           torch.float32))
    _, g_tasks = seeds(a.seed)
    maml = l2l.algorithms.MAML(model, lr=cfg.inner.lr, first_order=False)
    opt = torch.optim.Adam(maml.parameters(), lr=cfg.outer.lr)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out / "metrics.jsonl", "w") as log:
        for it in range(1, a.iterations + 1):
            batch = fam.sample_batch(cfg.meta_batch, g_tasks, split="train")
            s, q = batch.support, batch.query
            total, acc = 0.0, 0.0
            opt.zero_grad()
            for t in range(cfg.meta_batch):
                learner = maml.clone()
                for _ in range(cfg.inner.steps):
                    learner.adapt(F.cross_entropy(learner(s.x[t]), s.y[t]))
                logits = learner(q.x[t])
                loss = F.cross_entropy(logits, q.y[t])
                (loss / cfg.meta_batch).backward()
                total += float(loss) / cfg.meta_batch
                acc += float((logits.argmax(-1) == q.y[t]).float().mean()) / cfg.meta_batch
            opt.step()
            if it % a.log_every == 0 or it == a.iterations:
                row = {"iteration": it, "seconds": round(time.perf_counter() - t0, 3),
                       "outer/loss": total, "outer/accuracy": acc}
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(f"[{it}/{a.iterations}] query loss {total:.3f} accuracy {acc:.3f}",
                      file=sys.stderr, flush=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    checkpoint.save(out / checkpoint.CHECKPOINT,
                    checkpoint.Run(theta=to_metarl(model), config=cfg, iteration=a.iterations))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
