"""The reference `verify` compares a run with: the run's base model loaded with plain transformers and
its adapters with PEFT's own loader (not the model host's, not `lora_routing`), from files whose
hashes must still be those the run recorded."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from contract.artifacts import files_sha256
from contract.errors import VerifyError

from .engine.generation import eos_ids
from .engine.lora_routing import BASE
from .model_host import pick_dtype

if TYPE_CHECKING:
    from .verify import VerifyPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reference:
    """The base model (in a PeftModel when the run has adapters), loaded the plain way."""

    model: Any
    tokenizer: Any
    eos_ids: set[int]
    pad_id: int
    device: torch.device
    names: dict[str, str | None]  # variant -> what `plain.variant` takes (BASE: adapters disabled)


def _check_base_unchanged(plan: VerifyPlan) -> None:
    folder = plan.base_folder
    weights = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not weights:
        raise VerifyError(f"base model {folder} is not a model folder with .safetensors weights")
    if files_sha256([folder / "config.json", *weights]) not in plan.base_hashes:
        raise VerifyError(f"base model {folder} changed since run {plan.run_id} was generated; its outputs cannot be "
                          "reproduced from these files")


def load_reference(plan: VerifyPlan) -> Reference:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    _check_base_unchanged(plan)
    hf_logging.disable_progress_bar()
    device = torch.device(plan.device)
    remote = plan.config.model.trust_remote_code
    folder = str(plan.base_folder)
    log.info("loading %s (%s) on %s with plain transformers", folder, plan.dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=pick_dtype(plan.dtype, device),
                                                      trust_remote_code=remote, use_safetensors=True)
    model.to(device)
    model.eval()
    ends = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(ends)
    names: dict[str, str | None] = {}
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    for i, target in enumerate(plan.targets):
        if target.adapter_path is None:
            continue
        name = f"v{i}"  # a variant's own name may hold characters PEFT's module keys cannot
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(target.adapter_path, adapter_name=name, is_trainable=False)
            else:
                model = PeftModel.from_pretrained(model, target.adapter_path, adapter_name=name, is_trainable=False)
        except (RuntimeError, ValueError, OSError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise VerifyError(f"adapter '{target.name}' ({target.adapter_path}) does not load with PEFT: {first}") \
                from err
        names[target.name] = name
    model.eval()
    for target in plan.targets:
        if target.adapter_path is None:
            names[target.name] = BASE if isinstance(model, PeftModel) else None
    return Reference(model, tokenizer, ends, pad_id, device, names)
