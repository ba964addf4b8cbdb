#!/usr/bin/env bash
# The Omniglot initialisation study of the README: metarl against learn2learn on the
# same tasks (../shared/data/omniglot's background small 1, 5-way 1-shot, 300
# iterations, meta-batch 32, one inner step at 0.4, 300 test tasks scored after 3 steps).
#
#   bash scripts/omniglot_study.sh val    # initialisations scored on validation characters
#   bash scripts/omniglot_study.sh val2   # a smaller head; learn2learn on the same split
#   bash scripts/omniglot_study.sh test [SEEDS]  # the defaults against learn2learn, test side
#   bash scripts/omniglot_study.sh curves # the four algorithms, each initialisation
#
# Two runs at a time, one thread each; results in runs/omni-study/*/eval.json. The
# learn2learn runs need the peer harness's venv (../shared/bench-peers/setup_peers_venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/omniglot}
PEERS=${PEERS:-/tmp/peers-venv/bin/python}
ITERS=${ITERS:-300}
OUT=runs/omni-study
mkdir -p "$OUT"

metarl_run() {  # NAME SEED SPLIT VAL ALGO FAMILY-OPTIONS...
  local name=$1 seed=$2 split=$3 val=$4 algo=$5
  shift 5
  local opts=()
  for o in "$@"; do opts+=(--family-opt "$o"); done
  [ -f "$OUT/$name/eval.json" ] && return
  .venv/bin/metarl train --family omniglot --data "$DATA" --family-opt "split=$split" \
    --family-opt "val_fraction=$val" "${opts[@]}" --algo "$algo" --iterations "$ITERS" --seed "$seed" \
    --task-chunk 4 --log-every 10 --threads 1 --out "$OUT/$name" --overwrite > "$OUT/$name.log" 2>&1
  .venv/bin/metarl evaluate "$OUT/$name" --tasks 300 --steps 3 --threads 1 \
    --json "$OUT/$name/eval.json" >> "$OUT/$name.log" 2>&1
}

l2l_run() {  # NAME SEED SPLIT VAL
  local name=$1 seed=$2 split=$3 val=$4
  [ -f "$OUT/$name/eval.json" ] && return
  "$PEERS" scripts/l2l_omniglot.py --data "$DATA" --split "$split" --val-fraction "$val" \
    --seed "$seed" --iterations "$ITERS" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
  .venv/bin/metarl evaluate "$OUT/$name" --tasks 300 --steps 3 --threads 1 \
    --json "$OUT/$name/eval.json" >> "$OUT/$name.log" 2>&1
}

case "${1:-}" in
  val)
    metarl_run val-maml 11 character 0.25 maml bn_scale=one bn_eps=0.001 &
    metarl_run val-uniform 11 character 0.25 maml bn_scale=uniform bn_eps=0.001
    wait
    metarl_run val-eps5 11 character 0.25 maml bn_scale=one bn_eps=1e-05 &
    metarl_run val-uniform-eps5 11 character 0.25 maml bn_scale=uniform bn_eps=1e-05
    wait
    ;;
  val2)
    metarl_run val-head05 11 character 0.25 maml bn_scale=one bn_eps=0.001 head_std=0.5 &
    l2l_run val-l2l 11 character 0.25
    wait
    ;;
  test)
    shift
    for seed in "${@:-11}"; do
      metarl_run test-char-s$seed "$seed" character 0 maml &
      l2l_run test-char-l2l-s$seed "$seed" character 0
      wait
      metarl_run test-alpha-s$seed "$seed" alphabet 0 maml &
      l2l_run test-alpha-l2l-s$seed "$seed" alphabet 0
      wait
    done
    ;;
  curves)
    metarl_run test-char-one-s11 11 character 0 maml bn_scale=one &
    metarl_run curve-fomaml-s11 11 character 0 fomaml
    wait
    metarl_run curve-fomaml-one-s11 11 character 0 fomaml bn_scale=one &
    metarl_run curve-reptile-s11 11 character 0 reptile
    wait
    metarl_run curve-reptile-one-s11 11 character 0 reptile bn_scale=one &
    metarl_run curve-imaml-s11 11 character 0 imaml
    wait
    metarl_run curve-imaml-one-s11 11 character 0 imaml bn_scale=one
    ;;
  *)
    echo "usage: $0 val | val2 | test [SEEDS...] | curves" >&2
    exit 2
    ;;
esac
for f in "$OUT"/*/eval.json; do
  .venv/bin/python - "$f" <<'EOF'
import json, sys
e = json.load(open(sys.argv[1]))
m, ci = e["mean"], e["ci95"]
print(f"{sys.argv[1].split('/')[-2]:28s} " + "  ".join(f"k={k}: {a:.3f} +- {c:.3f}"
                                                   for k, (a, c) in enumerate(zip(m, ci))))
EOF
done
