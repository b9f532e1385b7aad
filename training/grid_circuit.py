"""Write the image-grid circuit into a fresh grid LLaVA (``python -m training.grid_vlm --init
circuit``).

Training the grid model from random weights on two CPU cores plateaued at the answer prior
(docs/results.md), so, as for the recall fixture, the circuit that answers the three kinds of
question is written into the weights. Everything not named here is zero (norm weights aside).

Vision tower (CLIP, hidden 64; both encoder layers are the identity: their output projections
are zero). A cell is one 14-pixel patch. The patch convolution and the position embedding give,
per patch, ``s_g = 1 - H(g, cell) / (H_min / 2)`` for each glyph g, with H the Hamming distance
of the cell's ink to g's bitmap and ``H_min`` the smallest distance between two glyphs, so
``s_g = 1`` for the cell's glyph and ``<= -1`` for every other (and for blank cells); and the
one-hot row and column of the patch. Two dims of +M and -M make CLIP's pre-layernorm an almost
constant scale; the projector subtracts a dim that is zero before the norm, which cancels the
norm's mean. The projector's GELU turns the glyph scores into a one-hot glyph.

Text model (Llama, hidden 256, 3 layers, 4 query heads over 2 KV heads of 64, rope_theta 1e8).
Every token carries a constant ``M_TEXT`` in dim ``BIAS``, which makes each RMSNorm (weights
``M_TEXT / sqrt(hidden)``) the identity up to 0.2 %. Text tokens carry flags for the words the
circuit reads and a one-hot hex value for " 0" ... " F" (rows, columns and glyphs are named by
hex digits in the questions); image tokens carry their glyph, row and column one-hots.

* layer 0, head 0: previous-token head (the constant on every rotary pair with a phase of one
  position, as in ``induction_init``), copying the previous token's word flags; its MLP marks the
  question's arguments: a hex value after " row" (row), " column" (column), " the" (where's
  glyph) or " many" (count's glyph), each with a flag of its kind of question;
* layer 1, head 0: every token averages the arguments seen so far (key: the argument flag; BOS a
  half-weight sink with a zero value), so from the question on each token holds the question;
* layer 2: head 0 matches (row, column) against the image tokens' one-hots and reads the glyph;
  head 2 matches the glyph and reads (row, column); head 3 matches the glyph against a BOS sink
  of equal logit and reads the sink's share, ``1 / (count + 1)``. Keys and queries use the rotary
  pairs whose frequency is so low that positions up to the context length barely rotate them.
  Its MLP picks the output by the kind of question and the current token: after the assistant
  header's newline the glyph (lookup), the row (where) or the count; the comma after a row; the
  column after the comma; otherwise ``<|im_end|>`` by default.

The three lookups are as sharp as ``LOOKUP_LOGIT`` (the matching cell against its row and column
mates) and ``GLYPH_LOGIT`` (a glyph against every other token) make them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from retentivekv_vllm.fixtures import grid

HIDDEN = 256
HEAD_DIM = 64
HALF = HEAD_DIM // 2
ROPE_THETA = 1e8
NUM_LAYERS = 3
VISION_HIDDEN = 64
TEXT_CONFIG = dict(
    hidden_size=HIDDEN,
    intermediate_size=256,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=HEAD_DIM,
    max_position_embeddings=1024,
    rope_theta=ROPE_THETA,
    rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
)
VISION_CONFIG = dict(
    hidden_size=VISION_HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2
)

LABELS = grid.LABELS
N = len(LABELS)  # 16 hex values: glyphs, rows, columns
M_TEXT = 50.0
M_VISION = 2000.0

# Text residual layout.
BIAS = 0
TOK_NL, TOK_COMMA, HEXCHAR, TOK_ROW, TOK_COL, TOK_THE, TOK_MANY, TOK_BOS = range(1, 9)
PREV_ROW, PREV_COL, PREV_THE, PREV_MANY, PREV_COMMA = range(9, 14)
ARG, KIND_LOOKUP, KIND_WHERE, KIND_COUNT = range(14, 18)
SINK_VALUE, LOOK_SINK, OUT_COMMA = range(18, 21)
HEX = slice(32, 48)  # " 0" ... " F"
Q_ROW, Q_COL, Q_GLYPH = (
    slice(48, 64),
    slice(64, 80),
    slice(80, 96),
)  # the question (gathered in place)
IMG_GLYPH, IMG_ROW, IMG_COL = slice(96, 112), slice(112, 128), slice(128, 144)
LOOK_GLYPH, LOOK_ROW, LOOK_COL = slice(144, 160), slice(160, 176), slice(176, 192)
OUT_HEX = slice(192, 208)
WORD_FLAGS = (TOK_ROW, TOK_COL, TOK_THE, TOK_MANY, TOK_COMMA)
PREV_FLAGS = (PREV_ROW, PREV_COL, PREV_THE, PREV_MANY, PREV_COMMA)

# Vision residual layout.
V_GLYPH, V_ROW, V_COL = slice(0, 16), slice(16, 32), slice(32, 48)
V_ZERO, V_PLUS, V_MINUS = 48, 49, 50

PREV_TOKEN_GAIN = 30.0  # logit per rotary pair of the previous-token head
GATHER_LOGIT = 30.0  # an argument; BOS gets half
LOOKUP_LOGIT = 8.0  # per matching coordinate: the cell 16, its row and column mates 8
GLYPH_LOGIT = 20.0  # a matching glyph, and the count head's BOS sink
GATE = 30.0  # MLP gates: silu(+-GATE/2) is on or off
COUNT_SLOPE = 400.0  # count thresholds: levels 1/(n+1) are at least 0.025 apart
OUTPUT_LOGIT = 20.0  # an answer token; <|im_end|> gets END_SHARE of it by default
END_SHARE = 0.3
LOW_PAIRS = range(16, 32)  # rotary pairs with theta_i <= 1e8 ** -0.5 = 1e-4


def token_ids(tokenizer) -> dict[str, int]:
    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in (
            ("nl", "Ċ"),
            ("comma", ","),
            ("row", "Ġrow"),
            ("column", "Ġcolumn"),
            ("the", "Ġthe"),
            ("many", "Ġmany"),
            ("end", "<|im_end|>"),
        )
    }
    ids["bos"] = tokenizer.bos_token_id
    for value, label in enumerate(LABELS):
        ids[f"hex{value}"] = tokenizer.convert_tokens_to_ids("Ġ" + label)
        ids[f"char{value}"] = tokenizer.convert_tokens_to_ids(label)
    if tokenizer.unk_token_id in ids.values() or None in ids.values():
        raise RuntimeError(f"a token the circuit reads is not in the vocabulary: {ids}")
    return ids


def _glyph_inks() -> np.ndarray:
    """[glyph, 14, 14] ink (1) of each glyph in its cell, as ``grid.render_board`` draws it."""
    inks = []
    for glyph in grid.GLYPHS:
        board = tuple(
            glyph + grid.BLANK * (grid.GRID - 1) if r == 0 else grid.BLANK * grid.GRID
            for r in range(grid.GRID)
        )
        pixels = np.asarray(grid.render_board(board).convert("L"))[: grid.CELL, : grid.CELL]
        inks.append(pixels < 128)
    return np.stack(inks).astype(np.float64)


@torch.no_grad()
def _write_vision(model, processor) -> None:
    tower = model.model.vision_tower  # transformers 5 flattens CLIPVisionModel
    for layer in tower.encoder.layers:  # identity: the residual branches add nothing
        layer.self_attn.out_proj.weight.zero_()
        layer.self_attn.out_proj.bias.zero_()
        layer.mlp.fc2.weight.zero_()
        layer.mlp.fc2.bias.zero_()
    # The processor maps a channel value v in [0, 255] to (v / 255 - mean) / std; ink is
    # linear in it: ink = (white - x) / (white - black).
    mean, std = processor.image_processor.image_mean[0], processor.image_processor.image_std[0]
    white, black = (1 - mean) / std, (0 - mean) / std
    inks = _glyph_inks()
    h_min = min(np.abs(a - b).sum() for i, a in enumerate(inks) for b in inks[i + 1 :])
    c = h_min / 2
    conv = tower.embeddings.patch_embedding.weight  # [hidden, 3, 14, 14]
    conv.zero_()
    position = tower.embeddings.position_embedding.weight  # [1 + patches, hidden]; 0 is CLS
    position.zero_()
    for g, ink in enumerate(inks):
        # H = sum(ink_g) + sum((1 - 2 ink_g) * ink(x)); s_g = 1 - H / c, read from channel 0.
        conv[V_GLYPH.start + g, 0] = torch.from_numpy((1 - 2 * ink) / ((white - black) * c))
        constant = ink.sum() + ((1 - 2 * ink) * white / (white - black)).sum()
        position[1:, V_GLYPH.start + g] = 1 - constant / c
    for patch in range(grid.GRID * grid.GRID):
        row, col = divmod(patch, grid.GRID)
        position[1 + patch, V_ROW.start + row] = 1.0
        position[1 + patch, V_COL.start + col] = 1.0
    position[:, V_PLUS] = M_VISION
    position[:, V_MINUS] = -M_VISION
    tower.pre_layrnorm.weight.fill_(1.0)
    tower.pre_layrnorm.bias.zero_()

    # After the norm a dim reads (x - mean) / sigma with sigma ~ M_VISION / sqrt(hidden / 2).
    sigma = M_VISION / math.sqrt(VISION_HIDDEN / 2)
    projector = model.model.multi_modal_projector
    sharpness = 6.0  # GELU(6) = 6, GELU(-6) = 0 to 1e-8
    w1, b1 = projector.linear_1.weight, projector.linear_1.bias  # [HIDDEN, VISION_HIDDEN]
    w2, b2 = projector.linear_2.weight, projector.linear_2.bias  # [HIDDEN, HIDDEN]
    for p in (w1, b1, w2, b2):
        p.zero_()
    for source, target in ((V_GLYPH, IMG_GLYPH), (V_ROW, IMG_ROW), (V_COL, IMG_COL)):
        for i in range(N):
            hidden = target.start + i  # the projector's hidden unit shares the text dim's index
            w1[hidden, source.start + i] = sharpness * sigma
            w1[hidden, V_ZERO] = -sharpness * sigma
            w2[target.start + i, hidden] = 1 / sharpness
    b2[BIAS] = M_TEXT


def _rope_pair_dims(pair: int) -> tuple[int, int]:
    return pair, pair + HALF


@torch.no_grad()
def _write_text(model, ids: dict[str, int]) -> None:
    lm = model.model.language_model
    norm_weight = M_TEXT / math.sqrt(HIDDEN)  # RMSNorm becomes ~ the identity
    for name, p in lm.named_parameters():
        if "norm" in name:
            p.fill_(norm_weight)
        else:
            p.zero_()
    model.lm_head.weight.zero_()

    embed = lm.embed_tokens.weight
    embed[:, BIAS] = M_TEXT
    for name, dim in (
        ("nl", TOK_NL),
        ("comma", TOK_COMMA),
        ("row", TOK_ROW),
        ("column", TOK_COL),
        ("the", TOK_THE),
        ("many", TOK_MANY),
        ("bos", TOK_BOS),
    ):
        embed[ids[name], dim] = 1.0
    embed[ids["bos"], SINK_VALUE] = 1.0
    for value in range(N):
        embed[ids[f"hex{value}"], HEX.start + value] = 1.0
        embed[ids[f"char{value}"], HEXCHAR] = 1.0
    unit = 1.0 / M_TEXT  # a weight on BIAS that reads 1
    scale = math.sqrt(HEAD_DIM)  # attention logits are q.k / scale

    # Layer 0, head 0 (KV head 0): the previous token. Rotated q.k = a^2 cos((delta - 1) theta_i).
    attn = lm.layers[0].self_attn
    theta = [ROPE_THETA ** (-2 * i / HEAD_DIM) for i in range(HALF)]
    a = math.sqrt(PREV_TOKEN_GAIN * scale) * unit
    for i in range(HALF):
        attn.q_proj.weight[i, BIAS] = a * math.cos(-theta[i])
        attn.q_proj.weight[i + HALF, BIAS] = a * math.sin(-theta[i])
        attn.k_proj.weight[i, BIAS] = a
    for j, (word, prev) in enumerate(zip(WORD_FLAGS, PREV_FLAGS)):
        attn.v_proj.weight[j, word] = 1.0
        attn.o_proj.weight[prev, j] = 1.0
    # Its MLP: a hex value after a question word is an argument of that kind.
    mlp = lm.layers[0].mlp
    roles = (
        (PREV_ROW, Q_ROW, KIND_LOOKUP),
        (PREV_COL, Q_COL, KIND_LOOKUP),
        (PREV_THE, Q_GLYPH, KIND_WHERE),
        (PREV_MANY, Q_GLYPH, KIND_COUNT),
    )
    on = 2 / GATE  # silu(GATE / 2) * on = 1
    neuron = 0
    for prev, target, kind in roles:
        for value in range(N):
            mlp.gate_proj.weight[neuron, HEX.start + value] = GATE
            mlp.gate_proj.weight[neuron, prev] = GATE
            mlp.gate_proj.weight[neuron, BIAS] = -1.5 * GATE * unit
            mlp.up_proj.weight[neuron, BIAS] = unit
            for dim in (target.start + value, ARG, kind):
                mlp.down_proj.weight[dim, neuron] = on
            neuron += 1

    # Layer 1, head 0 (KV head 0): average the arguments so far, on the slowest rotary pair.
    attn = lm.layers[1].self_attn
    slow = HALF - 1
    g = math.sqrt(GATHER_LOGIT * scale)
    attn.q_proj.weight[slow, BIAS] = g * unit
    attn.k_proj.weight[slow, ARG] = g
    attn.k_proj.weight[slow, TOK_BOS] = g / 2
    gathered = [*range(Q_ROW.start, Q_GLYPH.stop), KIND_LOOKUP, KIND_WHERE, KIND_COUNT]
    for j, dim in enumerate(gathered):
        attn.v_proj.weight[j, dim] = 1.0
        attn.o_proj.weight[dim, j] = 1.0

    # Layer 2: the lookups. Queries and keys on the low-frequency pairs: pair p's two dims.
    attn = lm.layers[2].self_attn
    low = [_rope_pair_dims(p) for p in LOW_PAIRS]
    # Head 0 (KV head 0): (row, column) -> glyph. The gathered row and column are halves.
    lookup = math.sqrt(LOOKUP_LOGIT * scale)
    for i, (first, second) in enumerate(low):
        attn.q_proj.weight[first, Q_ROW.start + i] = 2 * lookup
        attn.q_proj.weight[second, Q_COL.start + i] = 2 * lookup
        attn.k_proj.weight[first, IMG_ROW.start + i] = lookup
        attn.k_proj.weight[second, IMG_COL.start + i] = lookup
        attn.v_proj.weight[i, IMG_GLYPH.start + i] = 1.0
        attn.o_proj.weight[LOOK_GLYPH.start + i, i] = 1.0
    # Heads 2 and 3 (KV head 1): glyph -> (row, column); glyph against a BOS sink -> 1 / (n + 1).
    # The sink sits on the second dim of the slowest pair, whose first dim holds glyph F.
    kv1, head2, head3 = HEAD_DIM, 2 * HEAD_DIM, 3 * HEAD_DIM
    glyph = math.sqrt(GLYPH_LOGIT * scale)
    for i, (first, _) in enumerate(low):
        attn.k_proj.weight[kv1 + first, IMG_GLYPH.start + i] = glyph
        attn.q_proj.weight[head2 + first, Q_GLYPH.start + i] = glyph
        attn.q_proj.weight[head3 + first, Q_GLYPH.start + i] = glyph
    sink = _rope_pair_dims(slow)[1]
    attn.k_proj.weight[kv1 + sink, TOK_BOS] = glyph
    attn.q_proj.weight[head3 + sink, BIAS] = glyph * unit
    for i in range(N):
        attn.v_proj.weight[kv1 + i, IMG_ROW.start + i] = 1.0
        attn.v_proj.weight[kv1 + N + i, IMG_COL.start + i] = 1.0
        attn.o_proj.weight[LOOK_ROW.start + i, head2 + i] = 1.0
        attn.o_proj.weight[LOOK_COL.start + i, head2 + N + i] = 1.0
    attn.v_proj.weight[kv1 + 2 * N, SINK_VALUE] = 1.0
    attn.o_proj.weight[LOOK_SINK, head3 + 2 * N] = 1.0

    # Its MLP: the answer token for the kind of question and the current token.
    mlp = lm.layers[2].mlp
    neuron = 0

    def gated(
        conditions: dict[int, float], threshold: float, value: int | None, outputs: dict[int, float]
    ):
        """One neuron: silu(GATE * (sum(conditions) - threshold)) * (residual[value] or 1)."""
        nonlocal neuron
        for dim, weight in conditions.items():
            mlp.gate_proj.weight[neuron, dim] += GATE * weight
        mlp.gate_proj.weight[neuron, BIAS] += -GATE * threshold * unit
        if value is None:
            mlp.up_proj.weight[neuron, BIAS] = unit
        else:
            mlp.up_proj.weight[neuron, value] = 1.0
        for dim, weight in outputs.items():
            mlp.down_proj.weight[dim, neuron] = on * weight
        neuron += 1

    for i in range(N):
        gated({TOK_NL: 1, KIND_LOOKUP: 1}, 1.5, LOOK_GLYPH.start + i, {OUT_HEX.start + i: 1})
        gated({TOK_NL: 1, KIND_WHERE: 1}, 1.5, LOOK_ROW.start + i, {OUT_HEX.start + i: 1})
        gated({TOK_COMMA: 1, KIND_WHERE: 1}, 1.5, LOOK_COL.start + i, {OUT_HEX.start + i: 1})
    gated({HEXCHAR: 1, KIND_WHERE: 1, PREV_COMMA: -1}, 1.5, None, {OUT_COMMA: 1})
    # Count: z = LOOK_SINK + (TOK_NL - 1) + (KIND_COUNT - 1) is 1 / (n + 1) when counting, <= 0
    # otherwise; step_t(z) = silu(S (z - t) + 1) - silu(S (z - t)) is 1 above t and 0 below.
    levels = [1 / (n + 1) for n in range(grid.MAX_COUNT + 1)]
    thresholds = [(hi + lo) / 2 for hi, lo in zip(levels, levels[1:])] + [levels[-1] / 2]
    for n, t in enumerate(thresholds):
        # one-hot(n) = step_{t_n} - step_{t_(n-1)}: step t_n adds to n and takes from n + 1.
        outputs = {OUT_HEX.start + n: 1.0}
        if n < grid.MAX_COUNT:
            outputs[OUT_HEX.start + n + 1] = -1.0
        for shift, sign in ((1.0, 1.0), (0.0, -1.0)):
            for dim, weight in {
                LOOK_SINK: COUNT_SLOPE,
                TOK_NL: COUNT_SLOPE,
                KIND_COUNT: COUNT_SLOPE,
            }.items():
                mlp.gate_proj.weight[neuron, dim] = weight
            mlp.gate_proj.weight[neuron, BIAS] = (shift - COUNT_SLOPE * (2 + t)) * unit
            mlp.up_proj.weight[neuron, BIAS] = unit
            for dim, weight in outputs.items():
                mlp.down_proj.weight[dim, neuron] = sign * weight
            neuron += 1
    assert neuron <= TEXT_CONFIG["intermediate_size"]

    head = model.lm_head.weight
    for value in range(N):
        head[ids[f"char{value}"], OUT_HEX.start + value] = OUTPUT_LOGIT
    head[ids["comma"], OUT_COMMA] = OUTPUT_LOGIT
    head[ids["end"], BIAS] = END_SHARE * OUTPUT_LOGIT * unit


def write_grid_circuit(model, processor) -> None:
    """Overwrite every weight of ``model`` (``training.grid_vlm.make_model``'s layout) with the
    circuit."""
    cfg = model.config.text_config
    assert (
        cfg.hidden_size == HIDDEN
        and cfg.head_dim == HEAD_DIM
        and cfg.num_hidden_layers == NUM_LAYERS
    )
    assert model.config.vision_config.hidden_size == VISION_HIDDEN
    _write_vision(model, processor)
    _write_text(model, token_ids(processor.tokenizer))
