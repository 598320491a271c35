#!/usr/bin/env bash
# One call on a GPU machine: install the carried wheels (benchmarks/gpu_env.sh), run the GPU parity tests, then time.
#
#   bash benchmarks/gpu_all.sh [parity] [bench[=SECTIONS]] [profile]
#
# With no argument it does all three (parity, the full benchmark, the layer profile). Expects the
# wheels of fla-core, flash-linear-attention, mamba-ssm (Triton-only build), tilelang and its two
# helpers in .whl/, plus libz3.so.xz (tilelang's solver library); see docs/BENCHMARKS.md. Writes
# everything under $OUT (default runs/gpu): parity.txt, parity.xml, gpu_bench.{md,json}, profiles.
#
# What fits one 10-minute device call (H200, 16 cores): `parity bench=step` (parity on 6 pytest-xdist
# workers, about 5-6 minutes, most of it tilelang and fla compiles; then the step section, about a
# minute); then, in a second call, `bench=layer,attention,mixers profile` (about 6 minutes). Parity on 8
# workers then `bench=layer` took 302 + 192 s (2026-12-01).
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export OUT
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(parity bench profile)

. "$(dirname "$0")/gpu_env.sh"
gpu_env_install || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

rc=0
for step in "${steps[@]}"; do
  case $step in
    parity)
      # the GPU tests live in three files (the rest of the suite needs the CPU extras, absent here);
      # fla's fp32 chunk_simple_gla takes about 2.5 minutes to compile on an H100, so the tests
      # run on pytest-xdist workers side by side (one process needs about 1,600 s)
      # PARITY_TIMEOUT_S (0: none) interrupts pytest (SIGINT), which still prints its summary line
      timeout -s INT -k 30 "${PARITY_TIMEOUT_S:-0}" python3 -m pytest -p no:cacheprovider -m gpu -o addopts="" --timeout 400 -q -rs -n "${PARITY_WORKERS:-6}" \
        --junitxml "$OUT/parity.xml" tests/kernels/test_gpu_parity.py tests/kernels/test_gpu_step.py tests/test_train_gpu.py 2>&1 | tee "$OUT/parity.txt"
      rc=$((rc | ${PIPESTATUS[0]}))
      ;;
    bench|bench=*)
      sections=${step#bench}; sections=${sections#=}
      python3 benchmarks/gpu.py --out "$OUT" ${sections:+--sections "$sections"} || rc=1
      ;;
    profile)
      python3 benchmarks/gpu.py --out "$OUT/profile" --sections profile || rc=1
      ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
exit $rc
