#!/usr/bin/env bash
# Packs what benchmarks/gpu_checks.sh needs on a GPU machine that has torch, Triton and
# transformers but can fetch nothing: run it here, where the package registry answers, and
# carry the folder it fills (gpu-kit/, git-ignored) with the checkout.
#
#   bash benchmarks/gpu_kit.sh            (SHARED: the folder with models/ and data/, ../shared)
#
# gpu-kit/wheels  the Python packages llmkit and its CUDA tests import that such an image
#                 lacks (its own list: the server's, structured output's, the OpenAI client's),
#                 built for the machine's Python (PY_VERSION, 3.12) on x86-64 Linux;
#                 gpu_checks.sh installs them outside the image's site-packages
# gpu-kit/shared  stories260K, its padded copy and tinyshakespeare, for speculative.py
set -euo pipefail
cd "$(dirname "$0")/.."
kit=gpu-kit
shared=${SHARED:-../shared}
python=${PYTHON:-python3}
packages=(
    fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.2 uvicorn==0.54.0
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0 llguidance==1.9.1
    openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0
    distro==1.9.0 sniffio==1.3.1
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
    rpds-py==2026.9.1 compressed-tensors==0.20.0 loguru==0.7.3
)
platforms=(--platform manylinux2014_x86_64)
for n in 17 24 27 28 31 34 35 39; do
    platforms+=(--platform "manylinux_2_${n}_x86_64")
done
for f in models/stories260K models/stories260K-pad176 data/tinyshakespeare.txt; do
    if [ ! -e "$shared/$f" ]; then
        echo "gpu_kit.sh: no $shared/$f (set SHARED to the folder with models/ and data/)" >&2
        exit 2
    fi
done
rm -rf "$kit"
mkdir -p "$kit/wheels" "$kit/shared/models" "$kit/shared/data"
"$python" -m pip download -q --no-deps --only-binary=:all: --implementation cp \
    --python-version "${PY_VERSION:-3.12}" "${platforms[@]}" -d "$kit/wheels" "${packages[@]}"
cp -r "$shared/models/stories260K" "$shared/models/stories260K-pad176" "$kit/shared/models/"
cp "$shared/data/tinyshakespeare.txt" "$kit/shared/data/"
wheels=$(ls "$kit/wheels" | wc -l)
size=$(du -sh "$kit" | cut -f1)
echo "gpu_kit.sh: $wheels wheels and stories260K in $kit ($size); carry it: run(carry=[\"$kit\"])"
