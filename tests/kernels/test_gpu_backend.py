"""The GPU backend, as far as it runs without a GPU: its registration for CUSTOM, its place in
vLLM's Triton backend hierarchy, and its cache access, compression and decode path on CPU tensors
through Triton's interpreter, against the executor's torch path on plain tensors.
(vLLM's own unified Triton attention, which its forward calls first, needs a GPU.)"""

import pytest
import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import FullAttentionSpec

import retentivekv_vllm
from retentivekv_vllm.config import KVPolicyConfig
from retentivekv_vllm.core import RecurrentState, fold, retention_from_entropy
from retentivekv_vllm.engine.executor import RequestPlan, attend_live, compress
from retentivekv_vllm.engine.gpu_backend import (
    PagedSlots,
    RetentiveTritonAttentionBackend,
    RetentiveTritonAttentionImpl,
    RetentiveTritonMetadata,
    RetentiveTritonMetadataBuilder,
)
from retentivekv_vllm.engine.memory import LayerMemory, RequestMemory
from retentivekv_vllm.engine.slots import DenseSlots
from retentivekv_vllm.engine.worker import WORKER
from retentivekv_vllm.policies import make_policy

from .paged_batch import DEVICE, assert_close_scaled, make_paged_batch, tolerance

NUM_KV_HEADS, GROUP, HEAD_DIM, BLOCK_SIZE = 2, 2, 32, 16


def test_registered_for_custom():
    retentivekv_vllm.register()
    backend = AttentionBackendEnum.CUSTOM.get_class()
    assert backend is RetentiveTritonAttentionBackend
    # vLLM's layers look their backend up by name in the enum.
    assert AttentionBackendEnum[backend.get_name()] is AttentionBackendEnum.CUSTOM


def test_extends_the_triton_backend():
    backend = RetentiveTritonAttentionBackend
    assert issubclass(backend, TritonAttentionBackend)
    assert issubclass(backend.get_impl_cls(), TritonAttentionImpl)
    assert backend.get_builder_cls() is RetentiveTritonMetadataBuilder
    assert issubclass(RetentiveTritonMetadataBuilder, TritonAttentionMetadataBuilder)
    assert issubclass(RetentiveTritonMetadata, TritonAttentionMetadata)


def test_spec_is_tritons_without_a_loaded_policy(monkeypatch):
    # An engine started earlier in this process records its policy; this worker has none.
    monkeypatch.setattr(WORKER, "loaded", None)
    spec = FullAttentionSpec(
        block_size=BLOCK_SIZE, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_DIM, dtype=torch.float16
    )
    assert RetentiveTritonAttentionBackend.customize_spec(
        spec
    ) == TritonAttentionBackend.customize_spec(spec)


def test_request_slots_read_and_write_the_paged_cache():
    batch = make_paged_batch([40], NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, torch.float16, seed=3)
    slots = PagedSlots(batch.key_cache, batch.value_cache, batch.block_table[0], 7, 40)
    keys, values = slots.read()
    assert torch.equal(keys.cpu(), batch.keys[0][:, 7:40]) and torch.equal(
        values.cpu(), batch.values[0][:, 7:40]
    )

    packed_keys, packed_values = keys[:, ::3], values[:, ::3]  # 11 tokens, written from slot 29
    slots.write(29, packed_keys, packed_values)
    after_keys, after_values = slots.read()
    assert torch.equal(after_keys[:, 22:], packed_keys) and torch.equal(
        after_values[:, 22:], packed_values
    )
    assert torch.equal(after_keys[:, :22], keys[:, :22])  # below the written range: untouched


def make_impl(feature_map: str):
    with set_current_vllm_config(VllmConfig()):
        impl = RetentiveTritonAttentionImpl(
            NUM_KV_HEADS * GROUP, HEAD_DIM, HEAD_DIM**-0.5, NUM_KV_HEADS, None, None, "auto"
        )
    policy = make_policy(
        KVPolicyConfig.from_knobs(
            policy="retentive", budget=0.5, feature_map=feature_map, state_rank=16
        )
    )
    return impl, policy


class Layer:
    layer_name = "model.layers.0.self_attn.attn"


@pytest.mark.parametrize("feature_map", ["elu", "prf"])
def test_decode_rows_equal_the_cpu_path(feature_map):
    """Requests 0, 2 and 3 have folded tokens (1 has not, and is left alone); 0 and 2 hold a state
    each (one launch reads both), 3 none (a launch without states). The kernel path must give
    what the CPU backend's torch path gives on the same live slots."""
    impl, policy = make_impl(feature_map)
    seq_lens, live_start, with_state = [37, 20, 70, 50], [9, 0, 30, 12], (0, 2)
    batch = make_paged_batch(seq_lens, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, torch.float32, seed=6)
    gen = torch.Generator().manual_seed(2)
    query = torch.randn(len(seq_lens), NUM_KV_HEADS * GROUP, HEAD_DIM, generator=gen).to(DEVICE)
    phi = policy.feature_map(HEAD_DIM, impl.scale)
    plans = []
    for row, (n, s) in enumerate(zip(seq_lens, live_start)):
        memory = RequestMemory(f"request-{row}", n - 1, budget=n - s)
        plans.append(RequestPlan(memory, policy, row, row, row + 1, n, s, s))
        if row in with_state:
            folded = torch.randn(NUM_KV_HEADS, s, HEAD_DIM, generator=gen)
            gamma = retention_from_entropy(torch.rand(NUM_KV_HEADS, s, generator=gen), 0.9)
            empty = RecurrentState.zeros(NUM_KV_HEADS, phi.rank, HEAD_DIM)
            values = torch.randn(NUM_KV_HEADS, s, HEAD_DIM, generator=gen)
            state = fold(empty, phi.features(folded), values, gamma, torch.ones(NUM_KV_HEADS, s))
            memory.layer(Layer.layer_name, NUM_KV_HEADS, n, DEVICE).states = [
                RecurrentState(state.S.to(DEVICE), state.z.to(DEVICE))
            ]
    rows = torch.full((len(seq_lens), NUM_KV_HEADS * GROUP, HEAD_DIM), float("nan"), device=DEVICE)

    caches = (batch.key_cache, batch.value_cache)
    served = impl._decode(Layer(), 0, plans, query, caches, batch.block_table, rows)

    assert served == {0, 2, 3}
    assert rows[1].isnan().all()
    for row in served:
        n, s = seq_lens[row], live_start[row]
        memory = plans[row].memory.layer(Layer.layer_name, NUM_KV_HEADS, n, DEVICE)
        assert len(memory.states) == (row in with_state)
        expected = attend_live(
            plans[row],
            on_cpu(memory),
            query[row : row + 1].float().cpu(),
            DenseSlots(batch.keys[row][:, s:n], batch.values[row][:, s:n], s),
            impl.scale,
            0,
        )[0]
        reduction = n - s + HEAD_DIM + phi.rank
        assert_close_scaled(rows[row], expected, tolerance(torch.float32, reduction))


def on_cpu(memory):
    """The layer memory with its states on the CPU, for the torch path."""
    copy = RequestMemory("cpu", 0, 0).layer(
        "cpu", memory.positions.shape[0], memory.positions.shape[1]
    )
    copy.states = [RecurrentState(s.S.cpu(), s.z.cpu()) for s in memory.states]
    return copy


def test_layers_the_policy_cannot_serve_are_refused():
    """A sliding-window layer under a policy is refused while the model loads (the check the CPU
    backend shares, `settings.refuse_unsupported_layer`), and built without a policy."""
    impl_class = RetentiveTritonAttentionImpl
    config = VllmConfig(additional_config={"kv_policy": "retentive", "kv_budget": 0.5})
    try:
        with (
            set_current_vllm_config(config),
            pytest.raises(ValueError, match="--kv-policy retentive: models with sliding window"),
        ):
            impl_class(
                NUM_KV_HEADS * GROUP, HEAD_DIM, HEAD_DIM**-0.5, NUM_KV_HEADS, None, 8, "auto"
            )
    finally:
        WORKER.loaded = None
    with set_current_vllm_config(VllmConfig()):
        assert (
            impl_class(
                NUM_KV_HEADS * GROUP, HEAD_DIM, HEAD_DIM**-0.5, NUM_KV_HEADS, None, 8, "auto"
            ).policy
            is None
        )


@pytest.mark.parametrize("policy_name", ["retentive", "lookm"])
def test_compression_on_the_paged_cache_equals_the_dense_one(policy_name):
    """`executor.compress` through `PagedSlots` (scores from `observation_scores`, tokens read with
    `gather_slots` and packed with `write_slots`) folds what it folds through `DenseSlots` (scores
    in torch): the same kept tokens, positions and states, and the cache holds the packed tokens."""
    n, live_start, window = 70, 6, 8
    batch = make_paged_batch([n], NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, torch.float32, seed=8)
    gen = torch.Generator().manual_seed(5)
    queries = torch.randn(window, NUM_KV_HEADS * GROUP, HEAD_DIM, generator=gen)
    config = KVPolicyConfig.from_knobs(
        policy=policy_name,
        budget=0.5,
        sinks=2,
        window=4,
        observation_window=window,
        feature_map="prf",  # retentive's state (without a maps file it keeps none)
        state_rank=16,
    )
    policy = make_policy(config)
    # After an earlier fold each head's live slots hold the sinks and a different set of tokens.
    earlier = [
        torch.randperm(n - 6, generator=gen)[: n - live_start - 6] + 2 for _ in range(NUM_KV_HEADS)
    ]
    live_positions = torch.stack(
        [
            torch.cat([torch.arange(2), kept.sort().values, torch.arange(n - 4, n)])
            for kept in earlier
        ]
    )
    results = []
    for paged in (True, False):
        memory = LayerMemory.empty(NUM_KV_HEADS, n)
        memory.positions[:, live_start:n] = live_positions
        memory.remember_queries(queries, n - window, window)
        request = RequestMemory("request", n, budget=32)
        plan = RequestPlan(request, policy, 0, 0, 1, n, live_start, n - 32)
        if paged:
            caches = batch.key_cache, batch.value_cache
            slots = PagedSlots(*caches, batch.block_table[0], live_start, n)
        else:
            live = slice(live_start, n)
            slots = DenseSlots(batch.keys[0][:, live], batch.values[0][:, live], live_start)
        _, kept = compress(plan, memory, slots, HEAD_DIM**-0.5, 0)
        results.append((kept, memory, slots))
    (kept, memory, _), (dense_kept, dense_memory, dense_slots) = results
    assert torch.equal(kept, dense_kept)
    assert torch.equal(memory.positions[:, :n], dense_memory.positions[:, :n])
    torch.testing.assert_close(memory.accumulated[:, :n], dense_memory.accumulated[:, :n])
    assert len(memory.states) == len(dense_memory.states) == (policy_name == "retentive")
    for state, dense_state in zip(memory.states, dense_memory.states):
        torch.testing.assert_close(state.S, dense_state.S, rtol=1e-4, atol=1e-5)
    packed = slice(n - 32 - live_start, n - live_start)
    after_keys, after_values = PagedSlots(
        batch.key_cache, batch.value_cache, batch.block_table[0], live_start, n
    ).read()
    torch.testing.assert_close(after_keys[:, packed], dense_slots.keys[:, packed])
    torch.testing.assert_close(after_values[:, packed], dense_slots.values[:, packed])


def test_a_chunk_after_a_fold_is_attended_and_compressed_by_run_plan():
    """A prompt chunk of a request with folded tokens and a state (`_run_plan` on the paged cache):
    its rows are `executor.attend_live` over the live slots as plain tensors, merged with the state
    through the extension's merge; then the step compresses as `executor.compress` does on those
    tensors, timed into the worker's metrics."""
    impl, _ = make_impl("prf")
    n, live_start, chunk, window = 70, 6, 8, 8
    config = KVPolicyConfig.from_knobs(
        policy="retentive",
        budget=0.5,
        sinks=2,
        window=4,
        observation_window=window,
        feature_map="prf",
        state_rank=16,
    )
    policy = make_policy(config)
    batch = make_paged_batch([n], NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, torch.float32, seed=9)
    gen = torch.Generator().manual_seed(4)
    query = torch.randn(chunk, NUM_KV_HEADS * GROUP, HEAD_DIM, generator=gen)
    phi = policy.feature_map(HEAD_DIM, impl.scale, 0)
    folded = torch.randn(NUM_KV_HEADS, live_start, HEAD_DIM, generator=gen)
    ones = torch.ones(NUM_KV_HEADS, live_start)
    values = torch.randn(NUM_KV_HEADS, live_start, HEAD_DIM, generator=gen)
    state = fold(RecurrentState.zeros(NUM_KV_HEADS, phi.rank, HEAD_DIM), phi.features(folded),
                 values, ones, ones)  # fmt: skip
    live = slice(live_start, n)
    dense_slots = DenseSlots(batch.keys[0][:, live], batch.values[0][:, live], live_start)
    plans, memories = [], []
    for _ in range(2):  # the request on the paged cache, and its twin on plain tensors
        request = RequestMemory("request", n - chunk, budget=32)
        plans.append(RequestPlan(request, policy, 0, 0, chunk, n, live_start, n - 32))
        memories.append(request.layer(Layer.layer_name, NUM_KV_HEADS, n, DEVICE))
        # The earlier fold kept the two sinks and folded positions 2-7.
        memories[-1].positions[:, live] = torch.cat([torch.arange(2), torch.arange(8, n)])
        memories[-1].states = [RecurrentState(state.S.to(DEVICE), state.z.to(DEVICE))]
    plan, dense_plan = plans
    memory, dense_memory = memories
    expected = attend_live(dense_plan, dense_memory, query, dense_slots, impl.scale, 0)
    dense_memory.remember_queries(query.clone(), n - chunk, window)
    compress(dense_plan, dense_memory, dense_slots, impl.scale, 0)
    rows = torch.full((chunk, NUM_KV_HEADS * GROUP, HEAD_DIM), float("nan"), device=DEVICE)
    seconds = WORKER.memories.compress_seconds

    caches = (batch.key_cache, batch.value_cache)
    impl._run_plan(Layer(), 0, plan, query.to(DEVICE), caches, batch.block_table, rows, False)

    reduction = n - live_start + HEAD_DIM + phi.rank
    assert_close_scaled(rows.cpu(), expected, tolerance(torch.float32, reduction))
    assert torch.equal(memory.positions[:, :n].cpu(), dense_memory.positions[:, :n])
    torch.testing.assert_close(memory.states[0].S.cpu(), dense_memory.states[0].S)
    assert WORKER.memories.compress_seconds > seconds
