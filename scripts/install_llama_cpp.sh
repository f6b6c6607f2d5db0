#!/usr/bin/env bash
# Install llama-cpp-python into a virtual environment, built for this machine's CPU without llama.cpp's AMX
# backend, which can segfault in its first matrix multiplication (llama.cpp issue #20824).
#
#   scripts/install_llama_cpp.sh [PYTHON]        (default: .venv/bin/python)
#
# Building compiles llama.cpp (about 5 minutes on 2 cores), so the wheel is kept in a cache of its own, keyed by
# version, build flags and CPU: pip's own wheel cache ignores CMAKE_ARGS, and would hand back a wheel built with
# other flags. A GPU build is a different command: CMAKE_ARGS="-DGGML_CUDA=on" pip install llama-cpp-python.
set -euo pipefail
PYTHON=${1:-.venv/bin/python}
VERSION=0.3.36
FLAGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"
CPU=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | sha256sum | cut -c1-12)
KEY=$(printf '%s %s %s %s' "$VERSION" "$FLAGS" "$CPU" "$("$PYTHON" -c 'import sys; print(sys.version_info[:2])')" \
  | sha256sum | cut -c1-16)
CACHE=${CHATTUNE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chattune/wheels}/llama-cpp-python-$KEY

if ! ls "$CACHE"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION for this CPU (compiles llama.cpp: about 5 minutes on 2 cores)"
  staging="$CACHE.tmp-$$"
  rm -rf "$staging"
  trap 'rm -rf "$staging"' EXIT
  CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$PYTHON" -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python -w "$staging" \
    "llama-cpp-python==$VERSION"
  mkdir -p "$(dirname "$CACHE")"
  rm -rf "$CACHE"
  mv "$staging" "$CACHE"  # complete or absent: a killed build is never reused
fi
"$PYTHON" -m pip install -q --no-deps "$CACHE"/llama_cpp_python-*.whl
# Its own dependencies, minus the ones chattune already has (numpy, jinja2, typing-extensions).
"$PYTHON" -m pip install -q "diskcache>=5.6.1"
"$PYTHON" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
