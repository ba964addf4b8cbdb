#!/usr/bin/env bash
# The GPU check of metarl, in one command, on a CUDA machine (see README, "GPU").
#
#   scripts/gpu_check.sh wheels   # with the package index: download what the check installs
#   scripts/gpu_check.sh          # on the CUDA machine (offline if the wheels are there)
#
# `make gpu-wheels` and `make gpu-check` run these. The check:
#   1. installs metarl from this working tree (editable, with the mujoco extra) into $PYTHON,
#      from the wheels folder without the index when it holds wheels, else from the index;
#      $PYTHON's torch is pinned to the version it has, and the check fails if it changed;
#   2. runs the gpu-marked tests (tests/test_gpu.py), junit XML beside the results;
#   3. runs `metarl bench --device cuda --quick` (Omniglot on synthetic images unless
#      $METARL_OMNIGLOT names the data);
#   4. times the sinusoid MAML meta-iteration eager and as a CUDA graph;
#   5. writes everything to $GPU_CHECK_JSON (default: $OUT/gpu-check.json if $OUT is set,
#      else ./gpu-check.json) and prints a short table last.
# Each step has a time limit, so the whole check ends within 8 minutes; a step that fails
# or runs out of time is reported in the table and the JSON, and the exit code is 1.
#
# Without CUDA it stops, unless GPU_CHECK_ALLOW_CPU=1: a dry run of the same steps on the
# CPU (the gpu tests skip, the bench runs on cpu), which checks the plumbing.
#
# Variables: PYTHON (default python3: the one with torch), GPU_WHEELS (default .gpu-wheels),
# GPU_PY_VERSION (wheels: default 3.12), GPU_EXTRAS (default "mujoco"; "mujoco metaworld"
# adds Meta-World to the wheels and the install), GPU_CHECK_JSON, GPU_CHECK_PIP_ARGS (extra pip
# install arguments, e.g. --user), GPU_CHECK_ALLOW_CPU, GPU_CHECK_LIMITS ("install tests
# bench graphs" seconds, default "75 120 225 30").
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
extras=${GPU_EXTRAS:-mujoco}  # the extras installed (space-separated): add metaworld for Meta-World

# --- wheels: on a machine with the package index ----------------------------------------
if [ "${1:-}" = "wheels" ]; then
    set -e
    version=${GPU_PY_VERSION:-3.12}
    abi=cp${version/./}
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
             manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        platforms+=(--platform "$p")
    done
    get=("$PYTHON" -m pip download -q --only-binary=:all: --python-version "$version"
         --implementation cp --abi "$abi" --abi abi3 --abi none "${platforms[@]}" -d "$WHEELS")
    mkdir -p "$WHEELS"
    pins=$(mktemp)
    grep -v '^torch' constraints.txt > "$pins"  # mujoco's pin; torch is the machine's own
    # gymnasium and MuJoCo with every dependency (numpy and the like too, harmless where the
    # machine has them: pip keeps an installed version that satisfies), pytest, the build
    # backend of the editable install (pip builds it offline from this folder)
    "${get[@]}" -c "$pins" "gymnasium[mujoco]>=1.0" "mujoco>=3.2" pytest pytest-timeout \
        "setuptools>=77" wheel
    # Stable-Baselines3 without its dependencies: they would bring a CUDA build of torch
    "${get[@]}" --no-deps "stable-baselines3>=2.3"
    if [[ " $extras " == *" metaworld "* ]]; then  # opt-in: 37 MB, and SciPy
        "${get[@]}" -c "$pins" "metaworld==3.1.1"
    fi
    rm -f "$pins"
    if ls "$WHEELS" | grep -q '^torch-'; then
        echo "gpu-wheels: a torch wheel came along; remove it: the check keeps the machine's" >&2
        exit 1
    fi
    echo "gpu-wheels: $(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1), in $WHEELS"
    exit 0
fi

# --- the check ------------------------------------------------------------------------------
if [ -n "${GPU_CHECK_JSON:-}" ]; then result=$GPU_CHECK_JSON
elif [ -n "${OUT:-}" ]; then result=$OUT/gpu-check.json
else result=gpu-check.json; fi
work=$(mktemp -d)
read -r lim_install lim_tests lim_bench lim_graphs <<< "${GPU_CHECK_LIMITS:-75 120 225 30}"
steps=$work/steps.json

run_step() {  # run_step NAME LIMIT COMMAND...: output prefixed, process group stopped at LIMIT
    local name=$1 limit=$2
    shift 2
    "$PYTHON" scripts/gpu_report.py step "$name" "$limit" "$steps" -- "$@"
}

if ! "$PYTHON" -c 'import torch, numpy, typer, rich, matplotlib' 2>/dev/null; then
    echo "gpu-check: $PYTHON lacks torch, numpy, typer, rich or matplotlib: set PYTHON to the" \
         "Python that has them" >&2
    exit 2
fi
if "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    device=cuda
elif [ "${GPU_CHECK_ALLOW_CPU:-0}" = "1" ]; then
    device=cpu
    echo "gpu-check: no CUDA here: a dry run on the CPU (GPU_CHECK_ALLOW_CPU=1)"
else
    echo "gpu-check: $PYTHON's torch sees no CUDA device: run this on a CUDA machine (or set" \
         "GPU_CHECK_ALLOW_CPU=1 for a dry run of the steps on the CPU)" >&2
    exit 2
fi

torch_before=$("$PYTHON" -c 'import torch; print(torch.__version__, torch.__file__)')
pins=$work/pins.txt
echo "torch==${torch_before%% *}" > "$pins"  # the machine's torch stays as it is
grep -v '^torch' constraints.txt >> "$pins"
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    source_args=(--no-index --find-links "$WHEELS")
    echo "gpu-check: installing offline from $WHEELS"
else
    source_args=()
    echo "gpu-check: no wheels in $WHEELS: installing from the package index"
fi
# shellcheck disable=SC2086  # GPU_CHECK_PIP_ARGS is a list of arguments
run_step install "$lim_install" "$PYTHON" -m pip install -q --disable-pip-version-check \
    "${source_args[@]}" -c "$pins" ${GPU_CHECK_PIP_ARGS:-} -e ".[${extras// /,}]" pytest \
    pytest-timeout
torch_after=$("$PYTHON" -c 'import torch; print(torch.__version__, torch.__file__)')
if [ "$torch_before" != "$torch_after" ]; then
    echo "gpu-check: torch changed ($torch_before -> $torch_after): the install must not touch" \
         "it" >&2
    "$PYTHON" - "$steps" "$torch_before" "$torch_after" <<'PY'
import json, sys
path, before, after = sys.argv[1:]
d = json.load(open(path))
d["torch"] = {"status": f"changed: {before} -> {after}", "seconds": 0.0}
json.dump(d, open(path, "w"), indent=2)
PY
fi

run_step tests "$lim_tests" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider \
    --junitxml "$work/gpu-tests.xml" tests/test_gpu.py

data=${METARL_OMNIGLOT:-}
if [ -z "$data" ]; then
    data=$work/omniglot
    "$PYTHON" scripts/gpu_report.py omniglot "$data"
fi
# every section whose optional package is installed (Meta-World only with GPU_EXTRAS)
read -r -a sections <<< "$("$PYTHON" - <<'PY'
import importlib.util
from metarl.bench import SECTIONS
needs = {"locomotion": "mujoco", "metaworld": "metaworld"}
first = ["sinusoid", "omniglot", "rl"]
for name in [s for s in first if s in SECTIONS] + [s for s in SECTIONS if s not in first]:
    if importlib.util.find_spec(needs.get(name, "metarl")) is None:
        print(f"gpu-check: bench section {name} skipped ({needs[name]} is not installed)",
              file=__import__("sys").stderr)
    else:
        print("--section", name, end=" ")
PY
)"
# one section at a time, the first the README's numbers come from; each gets what is left
# of the bench's time, so a slow section costs only itself
bench_end=$(( $(date +%s) + lim_bench ))
for ((i = 0; i < ${#sections[@]}; i += 2)); do
    name=${sections[i+1]}
    left=$(( bench_end - $(date +%s) ))
    if [ "$left" -lt 5 ]; then
        echo "gpu-check: no time left for bench section $name"
        continue
    fi
    METARL_CACHE=$work/cache run_step "bench-$name" "$left" "$PYTHON" -m metarl.cli.main bench \
        --device "$device" --quick --section "$name" --data "$data" --json "$work/bench-$name.json"
done

run_step graphs "$lim_graphs" "$PYTHON" scripts/gpu_report.py graphs "$work/graphs.json" \
    --device "$device"

mkdir -p "$(dirname "$result")"
"$PYTHON" scripts/gpu_report.py report "$result" --steps "$steps" \
    --junit "$work/gpu-tests.xml" --graphs "$work/graphs.json" --bench "$work"/bench-*.json
rc=$?
rm -rf "$work"
exit $rc
