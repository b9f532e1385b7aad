"""What the engine should generate under a policy, computed without vLLM.

transformers runs the same tiny model with an attention function that applies the
policy the way docs/method.md defines it: prompt rows attend causally to everything;
at the end of the prompt the last `observation_window` queries score the prompt,
each head keeps sinks + the recent window + its top-k, the rest is folded (or
dropped); every later row attends to the kept prompt tokens and all generated
tokens, plus the states.  Greedy decoding recomputes the whole sequence each step,
which is exact because nothing before the prompt's end depends on later tokens.
For an image request the processor's outputs go to the vision-language model at every
step, and the prompt's image layout goes to the policy (the vision tower keeps
transformers' own attention).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoModelForImageTextToText

from retentivekv_vllm.config import KVPolicyConfig
from retentivekv_vllm.core import (
    PatchLayout,
    accumulated_attention,
    attention_probs,
    compressed_attention,
    local_attention,
)
from retentivekv_vllm.multimodal import TokenLayout
from retentivekv_vllm.policies import Observation, make_policy

NAME = "retentivekv_reference"


def _patch_layout(layout: TokenLayout | None, heads: int) -> PatchLayout | None:
    if layout is None:
        return None
    per_head = lambda x: x.expand(heads, -1)  # noqa: E731
    return PatchLayout(per_head(layout.image), per_head(layout.row), per_head(layout.col), layout.grids)


def _compress_prompt(policy, k, v, grouped_prompt_q, scale, g, layout):
    """Keep mask [Hkv, P] and states after compressing a prompt of P tokens."""
    c = policy.config
    heads, num_prompt, _ = k.shape
    budget = c.budget_tokens(num_prompt)
    if num_prompt <= budget:
        return torch.ones(heads, num_prompt, dtype=torch.bool), []
    sinks = min(c.sinks, budget)
    window = min(c.window, budget - sinks)
    first_obs = max(0, num_prompt - c.observation_window)
    obs_q = grouped_prompt_q[:, :, first_obs:].reshape(heads, -1, k.shape[-1])
    positions = torch.arange(num_prompt)
    probs = attention_probs(
        obs_q, k, scale, torch.arange(first_obs, num_prompt).repeat(g), positions
    )
    candidates = ((positions >= sinks) & (positions < num_prompt - window)).expand(heads, -1)
    obs = Observation(
        probs, positions.expand(heads, -1), candidates, accumulated_attention(probs),
        _patch_layout(layout, heads),
    )
    folded = candidates & ~policy.select(obs, budget - sinks - window)
    states = policy.absorb([], obs, folded, k, v, scale) if policy.keeps_state else []
    return ~folded, states


def _per_token_padded(mm_inputs: dict | None, length: int) -> dict:
    """The processor's outputs for a sequence of ``length`` tokens: per-prompt-token ones (such as
    Qwen-VL's ``mm_token_type_ids``, [1, P]) extended with zeros (text) over the generated tokens."""
    padded = {}
    for key, value in (mm_inputs or {}).items():
        if key.endswith("token_type_ids"):
            value = torch.nn.functional.pad(value, (0, length - value.shape[1]))
        padded[key] = value
    return padded


def reference_greedy(
    model_dir,
    prompt_ids: list[int],
    config: KVPolicyConfig,
    max_new_tokens: int,
    mm_inputs: dict | None = None,
    layout: TokenLayout | None = None,
) -> list[int]:
    """Greedy tokens under the policy; ``mm_inputs`` (the processor's pixel values and
    grids) and ``layout`` (where the prompt's image tokens sit) for an image request."""
    policy = make_policy(config)
    num_prompt = len(prompt_ids)

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        q, k, v = query[0].float(), key[0].float(), value[0].float()  # [H, L, d]
        num_q_heads, length, dim = q.shape
        heads = k.shape[0]
        g = num_q_heads // heads
        grouped = q.view(heads, g, length, dim)
        out = torch.empty(heads, g, length, v.shape[-1])
        prompt = slice(0, num_prompt)
        positions = torch.arange(length)
        prompt_out, _ = local_attention(
            grouped[:, :, prompt].reshape(heads, -1, dim), k[:, prompt], v[:, prompt],
            scaling, positions[prompt].repeat(g), positions[prompt],
        )
        out[:, :, prompt] = prompt_out.view(heads, g, num_prompt, -1)
        if length > num_prompt:
            keep, states = _compress_prompt(
                policy, k[:, prompt], v[:, prompt], grouped[:, :, prompt], scaling, g, layout
            )
            keep = torch.cat([keep, torch.ones(heads, length - num_prompt, dtype=torch.bool)], 1)
            feature_map = policy.feature_map(dim, scaling) if states else None
            decode_out = compressed_attention(
                grouped[:, :, num_prompt:].reshape(heads, -1, dim), k, v, scaling,
                positions[num_prompt:].repeat(g), positions, keep, states, feature_map,
            )
            out[:, :, num_prompt:] = decode_out.view(heads, g, length - num_prompt, -1)
        attn = out.reshape(num_q_heads, length, -1).transpose(0, 1).unsqueeze(0)
        return attn.to(query.dtype), None

    AttentionInterface.register(NAME, attention)
    if mm_inputs is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=NAME, dtype=torch.float32)
    else:
        model = AutoModelForImageTextToText.from_pretrained(
            model_dir, attn_implementation={"": "sdpa", "vision_config": "sdpa", "text_config": NAME},
            dtype=torch.float32,
        )
    model.eval()
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids]), **_per_token_padded(mm_inputs, len(ids))).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[num_prompt:]
