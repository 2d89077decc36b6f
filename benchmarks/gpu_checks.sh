#!/usr/bin/env bash
# What llmkit can check only on a CUDA GPU, in one go and most important first, for a GPU
# machine held for a short time: each step is cut off at its share of BUDGET seconds, so a
# step that runs long costs the steps after it their time, not the whole run's output.
#
#   tests        the CUDA tests (`pytest -k "cuda and not emulated"`: engines with CUDA
#                graphs against eager mode and transformers, the Triton kernels, int4 and
#                int8 products, sampling and drafts on the GPU without waits; not the CPU
#                emulator's, which CI runs; TESTS="EXPR": `-k EXPR` instead, such as
#                "cuda_int8 or triton_int8" after a change to those)
#   cuda         benchmarks/cuda.py on Llama-3-8B's shapes: bf16 (batch 1 and 16, eager,
#                64 and 256 concurrent requests) and its $METHODS copies (gptq,awq) at batch
#                1 and 16, beside $ANCHORS (hf-compiled: transformers' compiled static
#                cache); issue 37's targets. Each copy costs minutes (quantizing 8B shapes,
#                loading them), so int8 and w8a8 take a run of their own:
#                METHODS=int8,w8a8 ANCHORS= bash benchmarks/gpu_checks.sh cuda
#   speculative  benchmarks/speculative.py --device cuda --concurrency-1-only (issue 40's
#                batch-1 rows on a GPU; $ROUNDS rounds, 5; --shared from $SHARED where set)
#   speculative-all  the same at concurrency 1, 8 and 64, with ngram unlimited at 8 beside
#                (not by default: issue 40's every GPU row, a device call of its own)
#   bf16-1b      benchmarks/cuda.py on Llama-3.2-1B's shapes, bf16 alone: batch-1 decode with
#                up to 16 steps a call, with 1, and eager: the plain engine that
#                speculative.py's 1B rows are set against, with cuda.py's settings
#   int8-kernels benchmarks/cuda_int8.py at 1, 8, 16 and 64 rows (not by default): each int8
#                product at 8B's shapes beside bf16 cuBLAS, rows in DIR/int8-kernels.json
#   profile      benchmarks/cuda_profile.py on the 8B checkpoints a cuda step left in WORKDIR
#                (not by default; after cuda in the same call): where a batch-1 decode
#                step's time goes, the kernels a token launches, their time by kind and the
#                slowest ones, each checkpoint with dependent launches and without (a
#                process and a load each)
#
#   BUDGET=540 LOGS=DIR bash benchmarks/gpu_checks.sh [STEP ...]   (default: the first four)
#
# SHARED: the folder with stories260K's models/ and data/ (gpu-kit/shared where there is one,
# else speculative.py's default, ../shared); WORKDIR: where the checkpoints go
# (/tmp/llmkit-gpu-checks); PYTHON: python3. LOGS (gpu-checks) is relative to the checkout.
#
# Each step's output goes to DIR/STEP.log and its last lines to stdout; the results JSON a
# step writes is copied into DIR as STEP-NAME.json, and benchmarks/RESULTS.md at the end
# (all four steps: eight files, as many as a device call brings back from its $OUT).
# Set LLMKIT_COMMIT where the tree is a copy whose git metadata is not its own. llmkit and
# its dependencies must import with $PYTHON: where gpu-kit/wheels holds wheels (made by
# benchmarks/gpu_kit.sh), they are installed under WORKDIR/site first, and the steps run
# with that folder and the checkout on PYTHONPATH; else install llmkit (pip install -e
# ".[test]").
set -u
start=$SECONDS # the budget counts the whole run: the kit's install too
cd "$(dirname "$0")/.."
budget=${BUDGET:-540}
logs=${LOGS:-gpu-checks}
work=${WORKDIR:-/tmp/llmkit-gpu-checks}
python=${PYTHON:-python3}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests cuda speculative bf16-1b)
# seconds, before the budget's rest
declare -A cap=([tests]=240 [cuda]=480 [speculative]=240 [speculative-all]=540 [bf16-1b]=150
    [int8-kernels]=150 [profile]=300)
for s in "${steps[@]}"; do
    if [ -z "${cap[$s]:-}" ]; then
        echo "gpu_checks.sh: no step '$s' (steps: tests, cuda, speculative," \
            "speculative-all, bf16-1b, int8-kernels, profile)" >&2
        exit 2
    fi
done
if ! "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_checks.sh: torch sees no CUDA device" >&2
    exit 2
fi
mkdir -p "$logs" "$work"
if compgen -G "gpu-kit/wheels/*.whl" >/dev/null; then
    if ! "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$work/site" gpu-kit/wheels/*.whl >"$work/kit.log" 2>&1; then
        cp "$work/kit.log" "$logs" # only then: a device call brings back few files
        echo "gpu_checks.sh: gpu-kit/wheels did not install (see $logs/kit.log)" >&2
        exit 2
    fi
    export PYTHONPATH="$PWD:$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi
[ -z "${SHARED:-}" ] && [ -d gpu-kit/shared ] && SHARED=$PWD/gpu-kit/shared
failed=0

sums() { # a checksum line per result file, sorted
    find benchmarks/results -name '*.json' -exec md5sum {} + | sort
}

command_of() { # the step's command, into the array cmd
    case $1 in
    tests) cmd=("$python" -m pytest -q -p no:cacheprovider -k "${TESTS:-cuda and not emulated}" tests) ;;
    cuda) cmd=("$python" benchmarks/cuda.py --workdir "$work/cuda" --models 8b
        --methods "${METHODS-gptq,awq}" --calibration 4 --anchors "${ANCHORS-hf-compiled}") ;;
    speculative | speculative-all) # the first: the concurrency-1 rows alone
        local only=
        if [ "$1" = speculative ]; then only=--concurrency-1-only; fi
        cmd=("$python" benchmarks/speculative.py --device cuda ${only:+"$only"}
            --rounds "${ROUNDS:-5}" --workdir "$work/spec" ${SHARED:+--shared "$SHARED"}) ;;
    bf16-1b) cmd=("$python" benchmarks/cuda.py --workdir "$work/cuda" --models 1b --methods ""
        --anchors "" --bf16-parts eager) ;;
    int8-kernels) cmd=("$python" benchmarks/cuda_int8.py --rows 1,8,16,64
        --out "$logs/int8-kernels.json") ;;
    profile) cmd=("$python" benchmarks/cuda_profile.py) # then the checkpoints there are
        for d in "$work"/cuda/llama-8b "$work"/cuda/llama-8b-*; do
            [ -f "$d/config.json" ] && cmd+=("$d")
        done ;;
    esac
}

for s in "${steps[@]}"; do
    left=$((budget - (SECONDS - start)))
    if [ "$left" -lt 30 ]; then
        echo "== $s: not run, ${left}s of the budget left"
        failed=1
        continue
    fi
    limit=$((cap[$s] < left ? cap[$s] : left))
    command_of "$s"
    echo "== $s (cut off after ${limit}s): ${cmd[*]}"
    sums >"$work/.before-$s"
    t0=$SECONDS
    timeout -k 10 "$limit" "${cmd[@]}" >"$logs/$s.log" 2>&1
    rc=$?
    echo "== $s: exit $rc after $((SECONDS - t0))s$([ $rc -eq 124 ] && echo ', cut off')"
    tail -n 25 "$logs/$s.log"
    [ $rc -eq 0 ] || failed=1
    # the results the step wrote: those whose contents are new
    sums | comm -13 "$work/.before-$s" - | while read -r _ f; do
        cp "$f" "$logs/$s-$(basename "$f")"
    done
done
cp benchmarks/RESULTS.md "$logs"
exit $failed
