#!/usr/bin/env bash
# One call on a GPU machine: the look-up forecasters of benchmarks/train_lookup.py, side by side on one GPU.
#
#   bash benchmarks/train_lookup_gpu.sh [SECONDS] [RECIPES...]
#
# Installs the carried wheels (benchmarks/gpu_env.sh), trains each recipe (default: the two of the
# committed checkpoints and two program-run variants) for SECONDS (default 200) in its own process, then writes
# under $OUT (default runs/lookup-gpu): one <recipe>.tar per recipe (its checkpoint and lookup.json)
# and logs.tgz. The runs start their budgets together, once every one has compiled its kernels
# (--barrier). QUICK=1 runs the --quick sizes (a smoke test on any machine). The committed checkpoints
# came from `bash benchmarks/train_lookup_gpu.sh 330 ...` (daily, then named daily-guided; four recipes
# side by side; docs/BENCHMARKS.md, "look-up forecasters with guided attention") and `... 440 programs
# programs-mix-3h` (programs; two side by side; docs/RESULTS.md, "Look-up"); `train_lookup.py --steps`
# repeats them by their step counts.
set -u
OUT=${OUT:-runs/lookup-gpu}
mkdir -p "$OUT"
seconds=${1:-200}
shift || true
recipes=("$@")
[ ${#recipes[@]} -eq 0 ] && recipes=(programs daily programs-guided programs-unaligned-long)

. "$(dirname "$0")/gpu_env.sh"
gpu_env_install || exit 1
# the routed inputs' compiled graph recompiles as the number of attention tokens changes from batch to batch
export ORYX_COMPILE_ROUTED_INPUTS=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
work=$(mktemp -d)
for r in "${recipes[@]}"; do
  python3 benchmarks/train_lookup.py --recipe "$r" --out "$work" --seconds "$seconds" --threads 3 ${QUICK:+--quick --seeds 1} \
    --barrier "$work/ready:${#recipes[@]}" \
    > "$work/$r.log" 2>&1 &
done
wait
for r in "${recipes[@]}"; do
  tail -n 12 "$work/$r.log"
  [ -d "$work/$r" ] && tar -cf "$OUT/$r.tar" -C "$work" "$r"
done
tar -czf "$OUT/logs.tgz" -C "$work" $(cd "$work" && ls *.log)
