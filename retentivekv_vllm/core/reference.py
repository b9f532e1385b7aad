"""Compressed attention over a whole sequence in one call: the oracle for kernels and engine
tests."""

from collections.abc import Sequence

from torch import Tensor

from .feature_maps import FeatureMap
from .merge import local_attention, merge_with_state_readouts
from .state import RecurrentState


def compressed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    q_positions: Tensor,
    k_positions: Tensor,
    keep_mask: Tensor,
    states: Sequence[RecurrentState],
    feature_map: FeatureMap | None,
) -> Tensor:
    """Attention of q [H, m, d] (GQA rows grouped per KV head) over the kept part of k, v
    [H, n, d(v)] (keep_mask [H, n] bool, causal by position) plus every state's readout, read at
    the queries' positions, merged -> [H, m, dv] float32.

    States are read whole by every query: they hold tokens folded before any of these queries.
    Without states (eviction policies) this is attention over the kept tokens and
    `feature_map` may be None.
    """
    out_local, lse_local = local_attention(
        q, k, v, scale, q_positions, k_positions, key_mask=keep_mask
    )
    return merge_with_state_readouts(
        out_local, lse_local, q, states, feature_map, q_positions=q_positions
    )
