"""Files of learned feature maps: what `python -m retentivekv_vllm.calibrate` writes and the server
reads with ``--kv-maps FILE`` (which alone turns on ``retentive``'s learned state).

A file is safetensors: the maps of every layer stacked (``query_weight`` [L, H, d, r/2], ...),
and in its metadata the model they were fitted for (architecture, layer and head counts, head size,
a fingerprint of the attention weights), the settings they were fitted under and the held-out losses
calibration measured. Maps that de-rotate their inputs also hold the model's rotary frequencies
(``rope_inv_freq`` [d_rot / 2]). Maps fitted for one model are meaningless for another, so a server
refuses a file whose model does not match the one it serves and names what differs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from retentivekv_vllm.core import LearnedFeatureMap

FORMAT = "retentivekv-learned-maps/1"
# Maps the package ships, one file per model, named after the model's checkpoint directory
# (smollm2-135m-instruct.safetensors: python -m retentivekv_vllm.fixtures smollm2).
SHIPPED_MAPS_DIR = Path(__file__).resolve().parent / "maps"
ROPE_TENSOR = "rope_inv_freq"  # present when the maps de-rotate their inputs
_TENSORS = (
    "query_weight",
    "key_weight",
    "query_log_magnitude",
    "key_log_magnitude",
    "key_log_scale",
)


class MapsFileError(ValueError):
    """A maps file that cannot be read, or was fitted for another model; the message says which."""


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """What a maps file must match: the model's attention shapes and its attention weights."""

    architecture: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    fingerprint: str

    def differences(self, served: ModelIdentity) -> list[str]:
        """'field: file value vs served value' for every field that differs."""
        return [
            f"{f.name}: {getattr(self, f.name)!r} in the file, {getattr(served, f.name)!r} served"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(served, f.name)
        ]


def weights_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 over the names, shapes and float32 values of the checkpoint's attention tensors
    (every safetensors tensor with ``attn`` in its name): the weights that make the queries, keys
    and values the maps were fitted on. Independent of the dtype a model is loaded in."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    digest, count = hashlib.sha256(), 0
    for file in files:
        with safe_open(file, "pt") as reader:
            names = reader.keys()  # a safetensors reader, not a dict
            for name in sorted(n for n in names if "attn" in n):
                tensor = reader.get_tensor(name).float().contiguous()
                digest.update(f"{name}:{tuple(tensor.shape)};".encode())
                digest.update(tensor.numpy().tobytes())
                count += 1
    if count == 0:
        raise MapsFileError(
            f"{model_dir}: no safetensors attention weights to fingerprint (a Hugging Face "
            "checkpoint directory with *.safetensors files is needed)"
        )
    return digest.hexdigest()[:16]


def model_identity(model_dir: str | os.PathLike) -> ModelIdentity:
    """The identity of the Hugging Face checkpoint in `model_dir` (its config.json and weights)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    text = config.get_text_config()
    heads = text.num_attention_heads
    return ModelIdentity(
        architecture=(config.architectures or [config.model_type])[0],
        num_layers=text.num_hidden_layers,
        num_attention_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        fingerprint=weights_fingerprint(model_dir),
    )


def resolve_model_dir(model: str) -> Path:
    """A served model's checkpoint directory: `model` itself, or its snapshot in the local
    Hugging Face cache when it names a hub repository."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except Exception as error:  # noqa: BLE001 - any failure means: no local checkpoint to check
        raise MapsFileError(
            f"cannot find a local checkpoint of {model!r} to check the maps against: {error}"
        ) from None


@dataclasses.dataclass
class LearnedMaps:
    """The maps of every layer, the model they were fitted for, and how they were fitted."""

    layers: list[LearnedFeatureMap]
    model: ModelIdentity
    settings: dict[str, Any]
    results: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.layers[0].rank

    def layer(self, index: int | None) -> LearnedFeatureMap:
        if index is None or not 0 <= index < len(self.layers):
            raise MapsFileError(
                f"the maps file has layers 0..{len(self.layers) - 1}; layer {index!r} was asked for"
            )
        return self.layers[index]

    def check_model(self, served: ModelIdentity, source: str = "the maps file") -> None:
        """Raise MapsFileError naming every difference between the file's model and `served`."""
        differences = self.model.differences(served)
        if differences:
            raise MapsFileError(
                f"{source} was fitted for another model ({'; '.join(differences)}); fit maps "
                "for this model with python -m retentivekv_vllm.calibrate MODEL --out FILE"
            )

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        tensors = {
            name: torch.stack([getattr(m, name).detach().float() for m in self.layers]).contiguous()
            for name in _TENSORS
        }
        if self.layers[0].rope_inv_freq is not None:
            tensors[ROPE_TENSOR] = self.layers[0].rope_inv_freq.float().contiguous()
        metadata = {
            "format": FORMAT,
            "model": json.dumps(dataclasses.asdict(self.model)),
            "settings": json.dumps(self.settings),
            "results": json.dumps(self.results),
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LearnedMaps:
        """Read a maps file; MapsFileError (naming the file and the problem) for anything else."""
        from safetensors import SafetensorError, safe_open

        path = Path(path).expanduser()
        if not path.is_file():
            raise MapsFileError(f"{path}: no such file")
        try:
            with safe_open(str(path), "pt") as reader:
                metadata = reader.metadata() or {}
                if metadata.get("format") != FORMAT:
                    raise MapsFileError(
                        f"{path}: not a learned-maps file (format {metadata.get('format')!r}, "
                        f"expected {FORMAT!r})"
                    )
                missing = sorted(set(_TENSORS) - set(reader.keys()))
                if missing:
                    raise MapsFileError(f"{path}: tensors {missing} are missing")
                tensors = {name: reader.get_tensor(name) for name in _TENSORS}
                inv_freq = reader.get_tensor(ROPE_TENSOR) if ROPE_TENSOR in reader.keys() else None
            model = ModelIdentity(**json.loads(metadata["model"]))
            settings = json.loads(metadata["settings"])
            results = json.loads(metadata.get("results", "{}"))
            layers = [
                LearnedFeatureMap(*(tensors[name][i] for name in _TENSORS), inv_freq)
                for i in range(tensors["query_weight"].shape[0])
            ]
        except MapsFileError:
            raise
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as error:
            raise MapsFileError(f"{path}: unreadable maps file ({error})") from None
        if len(layers) != model.num_layers:
            raise MapsFileError(
                f"{path}: {len(layers)} layers of maps for a {model.num_layers}-layer model"
            )
        return cls(layers, model, settings, results)


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, modified_ns: int, size: int) -> LearnedMaps:
    return LearnedMaps.load(path)


def load_maps(path: str | os.PathLike) -> LearnedMaps:
    """`LearnedMaps.load`, read once per process for each version of the file."""
    path = Path(path).expanduser()
    try:
        stat = path.stat()
    except OSError as error:
        raise MapsFileError(f"{path}: {error.strerror or error}") from None
    return _load_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def check_maps_for_model(maps_path: str | os.PathLike, model: str) -> None:
    """Start-up check: the maps file fits the checkpoint `model` (a directory or a cached hub
    repository); MapsFileError naming what differs otherwise."""
    maps = load_maps(maps_path)
    maps.check_model(model_identity(resolve_model_dir(model)), f"maps file {maps_path}")
