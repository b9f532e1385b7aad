"""The C++ merge of decode rows with their requests' recurrent states
(`cpu_kernel.merge_state_readouts`)
against its plain-torch definition, `core.merge_with_state_readouts`, on states built by
`core.fold`, stored in float32 or bfloat16 (`core.storage_dtype`) as the engine stores them."""

import pytest
import torch

from retentivekv_vllm.core import RecurrentState, fold, make_feature_map, merge_with_state_readouts
from retentivekv_vllm.engine.cpu_kernel import decode_extension, merge_state_readouts

HEADS, HEAD_SIZE, RANK = 2, 64, 32  # RANK: prf's; elu's is HEAD_SIZE
SCALE = HEAD_SIZE**-0.5

pytestmark = pytest.mark.skipif(
    decode_extension().module is None, reason="the CPU kernel is not built here"
)


def folded_state(feature_map, generator, tokens: int, dtype=torch.float32) -> RecurrentState:
    state = RecurrentState.zeros(HEADS, feature_map.rank, HEAD_SIZE)
    if tokens == 0:
        return state.stored_as(dtype)  # holds no mass: its rows must come back unchanged
    keys, values = (torch.randn(HEADS, tokens, HEAD_SIZE, generator=generator) for _ in range(2))
    gamma = torch.rand(HEADS, tokens, generator=generator) * 0.1 + 0.9
    absorption = torch.rand(HEADS, tokens, generator=generator) + 0.5
    return fold(state, feature_map.features(keys), values, gamma, absorption).stored_as(dtype)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("feature_map_name", ["prf", "elu"])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("num_states", [1, 2])
def test_merge_matches_the_torch_definition(state_dtype, feature_map_name, group, num_states):
    generator = torch.Generator().manual_seed(group * 10 + num_states)
    feature_map = make_feature_map(feature_map_name, HEAD_SIZE, RANK, SCALE)
    requests = 5
    out = torch.randn(requests, HEADS, group, HEAD_SIZE, generator=generator)
    lse = torch.randn(requests, HEADS, group, generator=generator) * 3
    q = torch.randn(requests, HEADS, group, HEAD_SIZE, generator=generator) * 2
    rows = torch.tensor([4, 0, 2])  # requests 1 and 3 have no states and are not members
    folded = [[40, 7][:num_states], [0] * num_states, [300, 0][:num_states]]  # row 0: no mass
    states = [
        [folded_state(feature_map, generator, n, state_dtype) for n in member] for member in folded
    ]

    want = out.clone()
    for member, row in enumerate(rows.tolist()):
        want[row] = merge_with_state_readouts(
            out[row], lse[row], q[row], states[member], feature_map
        )
    got = out.clone()
    merge_state_readouts(got, lse, feature_map.query_log_features(q[rows]), rows, states)

    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert torch.equal(got[[1, 3]], out[[1, 3]])  # not members: untouched
    assert torch.equal(got[0], out[0])  # its states hold no mass
    assert not torch.allclose(got[4], out[4])  # the merge did something


def test_merge_refuses_states_of_mixed_dtypes():
    feature_map = make_feature_map("elu", HEAD_SIZE, RANK, SCALE)
    generator = torch.Generator().manual_seed(0)
    states = [[folded_state(feature_map, generator, 5), folded_state(feature_map, generator, 5)]]
    states[0][1] = states[0][1].stored_as(torch.bfloat16)
    out, lse = torch.zeros(1, HEADS, 1, HEAD_SIZE), torch.zeros(1, HEADS, 1)
    q = torch.randn(1, HEADS, 1, HEAD_SIZE, generator=generator)
    with pytest.raises(RuntimeError, match="of one dtype"):
        merge_state_readouts(out, lse, feature_map.query_log_features(q), torch.tensor([0]), states)
