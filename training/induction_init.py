"""Write a two-layer induction circuit into a fresh recall Llama (``--init induction``).

Training from random weights on two shared CPU cores did not get past chance within an
hour (docs/results.md), so the circuit that solves associative recall is written into the
weights and training then fine-tunes it. Residual stream (hidden 128):

* dims ``CONTENT`` hold each token's embedding (random, unit norm), dim ``BIAS`` a constant 1;
* layer 0, head 0 is a previous-token head: its query and key read only the constant dim and
  put it on every rotary pair with a phase of one position, so the logit
  ``Σ_i A·cos((Δ − 1)·θ_i)`` peaks at offset Δ = 1; its value/output copy the previous token's
  content (projected to the low-frequency rotary dims) into dims ``PREV``;
* layer 1, head 0 matches the query token's content against ``PREV`` (the key each value
  follows) on the rotary pairs whose frequency is so low (rope_theta 1e8) that positions up to
  the context length barely rotate them, and copies the matched value's content, amplified,
  into ``CONTENT``; the tied unembedding then reads the value out.

MLPs, the second head of each layer and everything else start at zero (norm weights at one).
"""

from __future__ import annotations

import math

import torch

HIDDEN = 128
CONTENT = slice(0, 56)
BIAS = 56
PREV = slice(64, 96)  # 32 dims: one per low-frequency rotary pair of layer 1
HEAD_DIM = 64
LOW_PAIRS = range(16, 32)  # rotary pairs with theta_i <= 1e8 ** -0.5 = 1e-4
ROPE_THETA = 1e8
PREV_TOKEN_GAIN = 30.0  # logit gap of about 20 between offset 1 and offsets 0 and 2
MATCH_GAIN = 120.0
COPY_GAIN = 8.0


@torch.no_grad()
def write_induction_circuit(model, seed: int) -> None:
    cfg = model.config
    assert cfg.hidden_size == HIDDEN and cfg.head_dim == HEAD_DIM and cfg.num_hidden_layers == 2
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.zero_()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
    width = CONTENT.stop - CONTENT.start
    embed = torch.randn(cfg.vocab_size, width, generator=generator)
    embed = embed / embed.norm(dim=-1, keepdim=True) * math.sqrt(HIDDEN / 2)
    model.model.embed_tokens.weight[:, CONTENT] = embed
    model.model.embed_tokens.weight[:, BIAS] = math.sqrt(HIDDEN / 2)
    # After RMSNorm the rows have norm sqrt(HIDDEN): content norm 8, constant 8.
    half = HEAD_DIM // 2
    theta = [ROPE_THETA ** (-2 * i / HEAD_DIM) for i in range(half)]
    scale_in = 1.0 / 8.0  # the constant dim reads 8 after the norm

    attn0 = model.model.layers[0].self_attn
    # Head 0, query and key from the constant dim; q~_i = a e^{-i theta_i}, k~_i = a (complex
    # pairs (i, i + 32)), so q.k rotated = a^2 cos((delta - 1) theta_i), summed over pairs.
    a = math.sqrt(PREV_TOKEN_GAIN * math.sqrt(HEAD_DIM)) * scale_in
    for i in range(half):
        attn0.q_proj.weight[i, BIAS] = a * math.cos(-theta[i])
        attn0.q_proj.weight[i + half, BIAS] = a * math.sin(-theta[i])
        attn0.k_proj.weight[i, BIAS] = a
    # Value: the previous token's content, projected to 32 dims; output into PREV.
    projection = torch.randn(PREV.stop - PREV.start, width, generator=generator) / math.sqrt(width)
    attn0.v_proj.weight[: PREV.stop - PREV.start, CONTENT] = projection
    attn0.o_proj.weight[PREV, : PREV.stop - PREV.start] = torch.eye(PREV.stop - PREV.start)

    attn1 = model.model.layers[1].self_attn
    # Query: the current token's content projected the same way, onto the low-frequency pairs;
    # key: PREV on the same pairs. Both are then barely rotated, so q.k is a content match.
    for j, pair in enumerate(LOW_PAIRS):
        for part, dim in enumerate((pair, pair + half)):
            row = 2 * j + part
            attn1.q_proj.weight[dim, CONTENT] = projection[row]
            attn1.k_proj.weight[dim, PREV.start + row] = 1.0
    attn1.q_proj.weight.mul_(MATCH_GAIN / 8.0)
    # Value: the attended token's content; output back into CONTENT, amplified over the query
    # token's own embedding.
    attn1.v_proj.weight[:width, CONTENT] = torch.eye(width)
    attn1.o_proj.weight[CONTENT, :width] = COPY_GAIN * torch.eye(width)
