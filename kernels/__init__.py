"""Triton kernels of RetentiveKV over vLLM's paged KV cache (`retentivekv_vllm.kernels`).

Each kernel has a plain-torch twin in `retentivekv_vllm.core`, which the tests compare it with:

* `observation_scores`: α and entropy potential of the observation window over the paged keys
  (twins: `attention_probs`, `accumulated_attention`, `entropy_potential`);
* `decode_attention`: one query token over the kept cache, merged with the state readout
  (`local_attention`, `readout`, `merge_with_states`);
* `gather_slots`, `write_slots`: reading a request's slots and writing each head's packed kept
  tokens;
* `merge_with_state`: the merge alone, from the CUDA C++ extension in `csrc/` where it can be
  built (`cuda_extension` says whether it was), else its twin `merge_with_states`.

Importing needs Triton but no GPU; launching needs a GPU, or TRITON_INTERPRET=1 set before this
package is imported (the kernels are then run by Triton's interpreter, on CPU tensors).
"""

from .compaction import gather_slots, write_slots
from .decode import PagedStates, decode_attention
from .extension import cuda_extension, merge_with_state
from .features import supports_feature_map
from .observation import observation_scores
from .paged import split_kv_cache

__all__ = [
    "PagedStates",
    "cuda_extension",
    "decode_attention",
    "gather_slots",
    "merge_with_state",
    "observation_scores",
    "split_kv_cache",
    "supports_feature_map",
    "write_slots",
]
