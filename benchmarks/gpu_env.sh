# Sourced by the GPU scripts (gpu_all.sh, train_lookup_gpu.sh): installs the wheels carried in .whl/ into
# /tmp/site and sets PYTHONPATH and LD_LIBRARY_PATH for them. Returns non-zero when an install fails.
#
# .whl/ holds: fla-core, flash-linear-attention, mamba-ssm (Triton-only build), tilelang's two helpers
# (apache-tvm-ffi, torch-c-dlpack-ext) as wheels; tilelang itself as the unpacked contents of its wheel in a
# .tar.xz (43 MB as a wheel, 24 MB so; its wheel has no .data folder, so unpacking it into the target is what
# pip does), which keeps .whl/ plus the tracked tree under the 64 MiB a device call carries; libz3.so.xz
# (tilelang's solver library). docs/BENCHMARKS.md, "GPU parity tests", says how they are made.
gpu_env_install() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "installing the wheels from .whl/ failed"; return 1; }
  fi
  local t
  for t in .whl/*.tar.xz; do
    [ -e "$t" ] || continue
    mkdir -p /tmp/site && tar -xJf "$t" -C /tmp/site || { echo "unpacking $t failed"; return 1; }
  done
  export PYTHONPATH=/tmp/site:$PWD
  # the GPU image has no polars, which oryx_ts.datasets imports for its file IO; the GPU tests and
  # training read no files, so an empty placeholder package (last on the path) lets them import
  if ! python3 -c "import polars" 2>/dev/null; then
    mkdir -p /tmp/stubs/polars && echo '# placeholder: polars is not installed here' > /tmp/stubs/polars/__init__.py
    export PYTHONPATH=$PYTHONPATH:/tmp/stubs
  fi
  # tilelang needs libz3.so on the library path (on sys.path it would shadow torch's optional z3 import)
  if [ -e .whl/libz3.so.xz ]; then
    mkdir -p /tmp/z3 && xz -dc .whl/libz3.so.xz > /tmp/z3/libz3.so && export LD_LIBRARY_PATH=/tmp/z3:${LD_LIBRARY_PATH:-}
  fi
}
