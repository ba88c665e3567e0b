#!/usr/bin/env bash
# Build llama.cpp exactly as vendored in llama-cpp-python 0.3.36 (the oracle version), once.
# Output: $QUANTBENCH_LLAMA_CPP_BUILD/bin/{libggml-base.so,llama-quantize,llama-perplexity,llama-imatrix}
# Native CPU flags are off (x86-64 + AVX2): the AMX repack path segfaults on quantized models here,
# and ggml-base (the quantizers) is compiled without FMA either way.
set -euo pipefail
VERSION=0.3.36
BUILD="${QUANTBENCH_LLAMA_CPP_BUILD:-$HOME/.cache/quantbench/llama.cpp-build}"
SRC_CACHE="${HOME}/.cache/quantbench/src"
need=(libggml-base.so llama-quantize llama-perplexity llama-imatrix)
ok=1
for f in "${need[@]}"; do [ -e "$BUILD/bin/$f" ] || ok=0; done
if [ "$ok" = 1 ]; then echo "llama.cpp oracle build present: $BUILD"; exit 0; fi
mkdir -p "$SRC_CACHE"
if [ ! -d "$SRC_CACHE/llama_cpp_python-$VERSION" ]; then
  python -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SRC_CACHE" >/dev/null
  tar -xzf "$SRC_CACHE/llama_cpp_python-$VERSION.tar.gz" -C "$SRC_CACHE"
fi
cmake -S "$SRC_CACHE/llama_cpp_python-$VERSION/vendor/llama.cpp" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_OPENMP=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DBUILD_SHARED_LIBS=ON >/dev/null
cmake --build "$BUILD" -j"$(nproc)" --target llama-quantize llama-perplexity llama-imatrix >/dev/null
echo "built llama.cpp $VERSION oracle: $BUILD"
