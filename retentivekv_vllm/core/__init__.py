"""RetentiveKV's method in plain torch: scores, feature maps, the recurrent state, readout and
merge."""

from .feature_maps import (
    FEATURE_MAPS,
    EluPlusOne,
    FeatureMap,
    FixedQuery,
    LearnedFeatureMap,
    PositiveRandomFeatures,
    ScaledReadout,
    make_feature_map,
)
from .merge import local_attention, merge_with_state_readouts, merge_with_states
from .reference import compressed_attention
from .scores import (
    PatchLayout,
    accumulated_attention,
    attention_probs,
    entropy_potential,
    gather_tokens,
    masked_logits,
    masked_softmax,
    modality_entropy,
    normalize_by_max,
    observation_statistics,
    pool1d,
    pool_scores,
    retention_score,
    select_topk,
)
from .state import (
    RecurrentState,
    absorption_from_attention,
    fold,
    fold_sequential,
    readout,
    retention_from_entropy,
)
from .visual import VisualFoldPlan, root_patches, visual_fold_plan

__all__ = [
    "FEATURE_MAPS",
    "EluPlusOne",
    "FeatureMap",
    "FixedQuery",
    "LearnedFeatureMap",
    "PatchLayout",
    "PositiveRandomFeatures",
    "RecurrentState",
    "ScaledReadout",
    "absorption_from_attention",
    "accumulated_attention",
    "attention_probs",
    "compressed_attention",
    "entropy_potential",
    "gather_tokens",
    "fold",
    "fold_sequential",
    "local_attention",
    "make_feature_map",
    "masked_logits",
    "masked_softmax",
    "merge_with_state_readouts",
    "merge_with_states",
    "normalize_by_max",
    "observation_statistics",
    "pool1d",
    "readout",
    "retention_from_entropy",
    "retention_score",
    "select_topk",
    "modality_entropy",
    "pool_scores",
    "root_patches",
    "visual_fold_plan",
    "VisualFoldPlan",
]
