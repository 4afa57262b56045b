"""Inspecting model and adapter folders without torch: identity hashes and shape compatibility.

Shapes come from safetensors headers (8 bytes of length, then JSON), so checking that an adapter
fits a base model reads a few kilobytes, not the weights.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import AdapterError, ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: The largest safetensors header we read (real headers are well under a megabyte).
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Prefix PEFT puts before module names in saved adapter weights.
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: Path
    sha256: str  # of adapter_config.json and the weights: the adapter's identity
    rank: int | None
    target_modules: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape
    #: The adapted layers store their weight as [in, out] (GPT-2's Conv1D) rather than [out, in].
    fan_in_fan_out: bool = False


def files_sha256(paths: list[Path]) -> str:
    """One digest over several files, each prefixed by its name and size."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def adapter_changed(name: str, folder: str | Path | None, recorded: str | None, found: str, *,
                    run: str = "the run") -> str:
    """What to say of an adapter whose files no longer hash as they did when `run` was submitted (the
    worker's refusal of a chunk and `verify`'s refusal say it alike)."""
    return (f"adapter '{name}' ({folder}) changed since {run} was submitted: its files hashed {recorded} at "
            f"submission and {found} now")


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the file's header alone."""
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: not a safetensors file (header of {length} bytes)")
        header = json.loads(fh.read(length))
    return {name: tuple(meta["shape"]) for name, meta in header.items() if name != "__metadata__"}


def inspect_adapter(name: str, folder: str | Path) -> AdapterInfo:
    """Check that `folder` holds a PEFT LoRA adapter in safetensors form; return its identity and shapes."""
    path = Path(folder)
    key = f"model.adapters.{name}"
    if not path.is_dir():
        raise AdapterError(f"adapter '{name}' ({key}): no such folder: {path}")
    config_file = path / ADAPTER_CONFIG
    weights = path / ADAPTER_WEIGHTS
    if not config_file.is_file():
        raise AdapterError(f"adapter '{name}' ({key}): {path} has no {ADAPTER_CONFIG}; is it a PEFT adapter folder?")
    if not weights.is_file():
        pickle = path / "adapter_model.bin"
        if pickle.is_file():
            raise AdapterError(
                f"adapter '{name}' ({key}): {path} has only adapter_model.bin (pickle, which can run code when "
                "loaded); convert it to safetensors: load it once with PEFT and save_pretrained(..., "
                "safe_serialization=True)"
            )
        raise AdapterError(f"adapter '{name}' ({key}): {path} has no {ADAPTER_WEIGHTS}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"adapter '{name}' ({key}): {config_file} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter '{name}' ({key}): {config_file} must be a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"adapter '{name}' ({key}): peft_type is '{peft_type or 'missing'}', only LORA is supported")
    try:
        shapes = safetensors_shapes(weights)
    except (OSError, ValueError) as err:
        raise AdapterError(f"adapter '{name}' ({key}): {err}") from None
    targets = config.get("target_modules") or ()
    if isinstance(targets, str):
        targets = (targets,)
    rank = config.get("r")
    _refuse_base_biases(name, key, config, shapes)
    return AdapterInfo(
        name=name,
        path=path,
        sha256=files_sha256([config_file, weights]),
        rank=rank if isinstance(rank, int) else None,
        target_modules=tuple(str(t) for t in targets),
        shapes=shapes,
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
    )


def _refuse_base_biases(name: str, key: str, config: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """An adapter trained with `bias: all` or `lora_only` carries new biases for layers of the base
    model; PEFT loads them into the base layers themselves, so they would change the base rows and
    every other adapter's rows as well. No path can serve that exactly beside other variants."""
    bias = str(config.get("bias", "none"))
    if bias == "none":
        return
    saved = [str(m) for m in config.get("modules_to_save") or ()]
    for tensor in sorted(shapes):
        module, _kind = _split_lora_name(tensor)
        plain = tensor[len(_PEFT_PREFIX):] if tensor.startswith(_PEFT_PREFIX) else tensor
        if module is not None or not plain.endswith(".bias"):
            continue
        owner = plain[: -len(".bias")]
        if any(owner == m or owner.endswith(f".{m}") or f".{m}." in f".{owner}." for m in saved):
            continue
        raise AdapterError(
            f"adapter '{name}' ({key}) was trained with bias='{bias}': it replaces the base model's bias {owner}, "
            "which would change the base rows and every other adapter's too; retrain it with bias='none' "
            "(lora_bias=True keeps a bias of its own)"
        )


def base_model_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape for a local Hugging Face model folder (single file or sharded)."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ConfigError(f"key 'model.base': {path} is not a model folder (no config.json)")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(
            f"key 'model.base': {path} has no .safetensors weights (pickle weights are not loaded; "
            "convert them with save_pretrained(..., safe_serialization=True))"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        shapes.update(safetensors_shapes(file))
    return shapes


def check_adapter_fits(info: AdapterInfo, base_shapes: dict[str, tuple[int, ...]], base_label: str) -> None:
    """Raise AdapterError unless every LoRA matrix of the adapter fits a module of the base model."""
    tied_head = "lm_head.weight" not in base_shapes and "model.embed_tokens.weight" in base_shapes
    for tensor, shape in sorted(info.shapes.items()):
        module, kind = _split_lora_name(tensor)
        if module is None:
            continue
        weight = base_shapes.get(f"{module}.weight")
        if weight is None and module == "lm_head" and tied_head:
            weight = base_shapes["model.embed_tokens.weight"]
        if weight is None:
            raise AdapterError(
                f"adapter '{info.name}' (model.adapters.{info.name}) was made for another base model: it adapts "
                f"'{module}', which {base_label} does not have"
            )
        if info.fan_in_fan_out and kind in ("lora_A", "lora_B", "lora_B.bias") and len(weight) == 2:
            weight = (weight[1], weight[0])  # Conv1D stores [in, out]
        if not _fits(kind, shape, weight):
            raise AdapterError(
                f"adapter '{info.name}' (model.adapters.{info.name}) was made for another base model: "
                f"{tensor} has shape {list(shape)}, which does not fit '{module}' of shape {list(weight)} "
                f"in {base_label}"
            )


def _split_lora_name(tensor: str) -> tuple[str | None, str]:
    name = tensor[len(_PEFT_PREFIX) :] if tensor.startswith(_PEFT_PREFIX) else tensor
    for kind in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
        marker = f".{kind}"
        if marker in name:
            module, rest = name.split(marker, 1)
            return module, f"{kind}.bias" if rest.endswith(".bias") else kind
    return None, ""


def _fits(kind: str, lora: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    if len(weight) != 2:
        return True  # convolutions and other layers: leave the check to PEFT at load time
    out_features, in_features = weight
    if kind == "lora_A":  # [r, in]
        return len(lora) == 2 and lora[1] == in_features
    if kind == "lora_B":  # [out, r]
        return len(lora) == 2 and lora[0] == out_features
    if kind == "lora_B.bias":  # [out] (lora_bias=True)
        return len(lora) == 1 and lora[0] == out_features
    if kind == "lora_embedding_A":  # [r, num_embeddings]; embedding weight is [num_embeddings, dim]
        return len(lora) == 2 and lora[1] == out_features
    if kind == "lora_embedding_B":  # [dim, r]
        return len(lora) == 2 and lora[0] == in_features
    return True
