"""What the engine should generate under a policy, computed without vLLM.

transformers runs the same tiny model with an attention function that applies the
policy the way docs/method.md defines it: prompt rows attend causally to everything;
at the end of the prompt the engine's own compression (``executor.compress``, over plain
tensors) scores the prompt with the last `observation_window` queries, keeps sinks + the
recent window + each head's top-k and folds the rest (or drops it, or merges it into the
kept tokens for ``lookm``); every later row attends to the kept prompt tokens, as the
compression left them, and all generated tokens, plus the states. Greedy decoding recomputes
the whole sequence each step, which is exact because nothing before the prompt's end depends
on later tokens.
For an image request the processor's outputs go to the vision-language model at every
step, and the prompt's image layout goes to the policy (the vision tower keeps
transformers' own attention).
"""

from __future__ import annotations

import torch
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
)

from retentivekv_vllm.config import KVPolicyConfig
from retentivekv_vllm.core import compressed_attention, local_attention
from retentivekv_vllm.core.feature_maps import rotary_frequencies_from_config
from retentivekv_vllm.engine.executor import compress_tensors
from retentivekv_vllm.multimodal import TokenLayout
from retentivekv_vllm.policies import POLICIES, make_policy

NAME = "retentivekv_reference"


def _compress_prompt(policy, q, k, v, scale, layer, layout):
    """The prompt's keys, values and positions [Hkv, b] after compressing its P tokens (q
    [Hq, P, d], k, v [Hkv, P, d]) to its budget b, and the states of layer `layer`."""
    heads, num_prompt, _ = k.shape
    budget = policy.config.budget_tokens(num_prompt)
    if num_prompt <= budget:
        return k, v, torch.arange(num_prompt).expand(heads, -1), []
    slots, memory, _, _ = compress_tensors(
        policy, q.transpose(0, 1), k, v, scale, budget, layer, token_layout=layout
    )
    kept = slice(num_prompt - budget, num_prompt)
    return slots.keys[:, kept], slots.values[:, kept], memory.positions[:, kept], memory.states


def _per_token_padded(mm_inputs: dict | None, length: int) -> dict:
    """The processor's outputs for a sequence of ``length`` tokens: per-prompt-token ones (such as
    Qwen-VL's ``mm_token_type_ids``, [1, P]) extended with zeros (text) over the generated
    tokens."""
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
    # The model's rotary frequencies, as the engine reads them from vLLM's model config.
    rotary = None
    if POLICIES[config.policy].needs_rotary:
        rotary = rotary_frequencies_from_config(AutoConfig.from_pretrained(model_dir))
    policy = make_policy(config, rotary)
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
            grouped[:, :, prompt].reshape(heads, -1, dim),
            k[:, prompt],
            v[:, prompt],
            scaling,
            positions[prompt].repeat(g),
            positions[prompt],
        )
        out[:, :, prompt] = prompt_out.view(heads, g, num_prompt, -1)
        if length > num_prompt:
            kept_k, kept_v, kept_positions, states = _compress_prompt(
                policy, q[:, prompt], k[:, prompt], v[:, prompt], scaling, module.layer_idx, layout
            )
            generated = slice(num_prompt, length)
            feature_map = policy.feature_map(dim, scaling, module.layer_idx) if states else None
            decode_out = compressed_attention(
                grouped[:, :, generated].reshape(heads, -1, dim),
                torch.cat([kept_k, k[:, generated]], 1),
                torch.cat([kept_v, v[:, generated]], 1),
                scaling,
                positions[generated].repeat(g),
                torch.cat([kept_positions, positions[generated].expand(heads, -1)], 1),
                None,
                states,
                feature_map,
            )
            out[:, :, num_prompt:] = decode_out.view(heads, g, length - num_prompt, -1)
        attn = out.reshape(num_q_heads, length, -1).transpose(0, 1).unsqueeze(0)
        return attn.to(query.dtype), None

    AttentionInterface.register(NAME, attention)
    if mm_inputs is None:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, attn_implementation=NAME, dtype=torch.float32
        )
    else:
        model = AutoModelForImageTextToText.from_pretrained(
            model_dir,
            attn_implementation={"": "sdpa", "vision_config": "sdpa", "text_config": NAME},
            dtype=torch.float32,
        )
    model.eval()
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(
                input_ids=torch.tensor([ids]), **_per_token_padded(mm_inputs, len(ids))
            ).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[num_prompt:]
