"""Greedy tokens from a vLLM engine in a process of its own.

For runs that cannot share the test process: stock vLLM with this plugin not loaded
(the caller sets VLLM_PLUGINS=""), or tensor parallelism (worker processes).
Usage: python -m tests.engine.generate_in_subprocess SPEC_JSON OUT_JSON, where SPEC_JSON
holds {"model": dir, "prompts": [...], "max_tokens": n, "engine": {LLM kwargs}}; a prompt is
a list of token ids, or {"prompt": text, "images": [PNG paths]} for an image request.
"""

import json
import sys

from PIL import Image
from vllm import LLM, SamplingParams


def engine_prompt(prompt):
    if isinstance(prompt, list):
        return {"prompt_token_ids": prompt}
    images = [Image.open(path).convert("RGB") for path in prompt["images"]]
    return {"prompt": prompt["prompt"], "multi_modal_data": {"image": images}}


if __name__ == "__main__":
    spec = json.loads(open(sys.argv[1]).read())
    llm = LLM(model=spec["model"], **spec["engine"])
    outputs = llm.generate(
        [engine_prompt(p) for p in spec["prompts"]],
        SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True),
        use_tqdm=False,
    )
    with open(sys.argv[2], "w") as f:
        json.dump([list(o.outputs[0].token_ids) for o in outputs], f)
