#!/usr/bin/env bash
# Builds the `cuda` feature of lemur-worker and lemur-profile on this machine (no GPU
# needed) for the H100 machine, following ../shared/FIELD-NOTES.md: nvcc and the CUDA 13.0
# libraries from PyPI in a venv, a CUDA root with unversioned library names and a libcuda
# stub to link against, and an rpath to the GPU machine's /usr/local/cuda. CI does not run
# this. Output: target/cuda/release/{lemur-worker,lemur-profile}, and target/cuda/gpu-bins.tar.xz
# (both, stripped and compressed, small enough to carry to the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${LEMUR_CUDA_CACHE:-$HOME/.cache/lemurian/cuda13}
VENV=$CACHE/venv
ROOT=$CACHE/root
mkdir -p "$CACHE"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# Stay on 13.0: kernels from a newer nvcc need a newer driver than the H100 machine has.
"$VENV/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
CU=$("$VENV/bin/python" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))")
mkdir -p "$ROOT/lib64/stubs"
for d in bin include nvvm; do ln -sfn "$CU/$d" "$ROOT/$d"; done
for f in "$CU"/lib/lib*.so*; do
  ln -sf "$f" "$ROOT/lib64/$(basename "$f")"
  ln -sf "$f" "$ROOT/lib64/$(basename "$f" | sed -E 's/\.so\..*$/.so/')"
done
# A stub libcuda.so.1 with every driver entry point cudarc names; the real one is on the GPU machine.
find_sys() { ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19.*/src/driver/sys 2>/dev/null | head -1 || true; }
SYS=$(find_sys)
[ -n "$SYS" ] || { cargo fetch -q; SYS=$(find_sys); }
[ -n "$SYS" ] || { echo "build-cuda: cudarc's sources not found after cargo fetch" >&2; exit 1; }
grep -rhoE '\bcu[A-Z][A-Za-z0-9_]*\b' "$SYS" | sort -u | awk '{print "void " $1 "(void) {}"}' > "$CACHE/cuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$ROOT/lib64/stubs/libcuda.so" "$CACHE/cuda_stub.c"
ln -sf stubs/libcuda.so "$ROOT/lib64/libcuda.so"
export CUDA_ROOT=$ROOT CUDA_PATH=$ROOT CUDA_HOME=$ROOT PATH=$ROOT/bin:$PATH
export CUDA_COMPUTE_CAP=90 CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}
export LIBRARY_PATH=$ROOT/lib64:$ROOT/lib64/stubs
export RUSTFLAGS="-C link-arg=-Wl,-rpath,/usr/local/cuda/lib64 -L $ROOT/lib64 -L $ROOT/lib64/stubs"
cargo build --release --target-dir target/cuda -p lemurian --features cuda --bin lemur-profile
cargo build --release --target-dir target/cuda -p lemur-worker --features cuda --bin lemur-worker
cargo build --release --target-dir target/cuda -p lemurian --features cuda --example attention_parts
out=target/cuda/gpu-bins
rm -rf "$out" && mkdir -p "$out"
cp target/cuda/release/lemur-worker target/cuda/release/lemur-profile target/cuda/release/examples/attention_parts "$out/"
strip "$out"/*
tar -C target/cuda -cJf target/cuda/gpu-bins.tar.xz gpu-bins
ls -la target/cuda/gpu-bins.tar.xz
