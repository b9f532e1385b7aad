"""Run NVIDIA kvpress's presses on one prompt and save what they saw and scored, per layer.

Runs in kvpress's own environment (it pins transformers < 5.3), so it imports only torch,
transformers and kvpress -- nothing of this project:

    KVPRESS_PYTHON benchmarks/kvpress/dump.py MODEL_DIR PROMPT.json OUT.pt

PROMPT.json holds ``{"token_ids": [...], "compression_ratio": r, "presses": {name: kwargs}}``
with names among snapkv, streaming, observed, knorm, expected_attention. OUT.pt holds, per layer,
the post-RoPE queries of every prompt position [Hq, T, d], the keys and values [Hkv, T, d], and
per press the scores [Hkv, T] and the kept indices (kvpress's own top-k).
"""

import json
import sys

import torch
import transformers
from kvpress import (
    ExpectedAttentionPress,
    KnormPress,
    ObservedAttentionPress,
    SnapKVPress,
    StreamingLLMPress,
)
from kvpress.utils import get_prerope_query_states
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.models.llama.modeling_llama import rotate_half

PRESSES = {
    "snapkv": SnapKVPress,
    "streaming": StreamingLLMPress,
    "observed": ObservedAttentionPress,
    "knorm": KnormPress,
    "expected_attention": ExpectedAttentionPress,
}


def main(model_dir: str, prompt_path: str, out_path: str) -> None:
    transformers.utils.logging.disable_progress_bar()
    spec = json.loads(open(prompt_path).read())
    # eager: ObservedAttentionPress reads the attention weights the layer returns.
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager", dtype=torch.float32
    )
    model.eval()
    ids = torch.tensor([spec["token_ids"]])
    layers: dict[int, dict] = {}
    for name, kwargs in spec["presses"].items():
        press = PRESSES[name](compression_ratio=spec["compression_ratio"], **kwargs)
        score = press.score

        def recording_score(
            module, hidden_states, keys, values, attentions, kw, name=name, score=score
        ):
            scores = score(module, hidden_states, keys, values, attentions, kw)
            layer = layers.setdefault(module.layer_idx, {})
            if "queries" not in layer:
                cos, sin = kw["position_embeddings"]
                q = get_prerope_query_states(module, hidden_states)
                q = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)
                layer["queries"], layer["keys"] = q[0].clone(), keys[0].clone()
                layer["values"] = values[0].clone()
            n_kept = int(keys.shape[2] * (1 - spec["compression_ratio"]))
            layer[name] = {
                "scores": scores[0].clone(),
                "kept": scores[0].topk(n_kept, dim=-1).indices.sort(-1).values,
            }
            return scores

        press.score = recording_score
        with torch.no_grad(), press(model):
            model(
                input_ids=ids,
                past_key_values=DynamicCache(),
                output_attentions=(name == "observed"),
            )
    torch.save({"layers": layers, "scale": model.model.layers[0].self_attn.scaling}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
