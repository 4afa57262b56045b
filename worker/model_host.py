"""The model host: one base model and its LoRA adapters, resident in one worker process.

The base weights exist once. Every adapter is loaded by name onto the same `PeftModel` and stays
resident (least recently used out first, above a bound). An adapter's PEFT name is derived from the
hash of its files, so two runs may both call their adapter `math`, a changed folder is loaded anew,
and each output records which adapter version produced it. Nothing is loaded at import time.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from contract.artifacts import files_sha256, inspect_adapter
from contract.config import DatasetConfig, GenerationConfig, InferenceConfig, ModelConfig
from contract.errors import AdapterError, ModelLoadError
from contract.settings import DEFAULT_MAX_ADAPTERS, Settings

from . import heap
from .demo_model import prepare_demo_model
from .engine import cpu_attention, lora_routing
from .engine.generation import GenResult, GenRow, eos_ids, generate_mixed, generate_separate
from .engine.loglik import ScoreOptions, score_rows
from .generated import ScoreResult, ScoreRow, StopFlag
from .harness_encoding import context_limit as harness_context_limit
from .harness_encoding import encode_choices, tok_encode
from .harness_encoding import prefix_token_id as harness_prefix_token_id
from .prompts import encode_prompts, prompt_text
from .windows import harness_max_length

if TYPE_CHECKING:
    from .engine.call import DecodeOptions

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str | None) -> torch.device:
    """`auto`/None: the first GPU when there is one, else the CPU."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a GPU that supports it, float16 on one that does not, float32 on the CPU."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass(frozen=True)
class BaseKey:
    """What identifies a loaded base model: its folder and the load options."""

    folder: str
    dtype: str
    trust_remote_code: bool


#: Files of a model folder besides config.json and the weights that change what it generates or how
#: its tokens read: the tokenizer, its chat template, the generation config (EOS ids).
_TOKENIZER_FILES = ("tokenizer*.json", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                    "*.model", "chat_template.*", "generation_config.json")


@dataclass(frozen=True)
class ModelIdentity:
    """Everything about the resident base model that changes an output (the generation cache's key)."""

    base_hash: str  # config.json and the weights
    tokenizer_hash: str  # `_TOKENIZER_FILES`
    dtype: str  # as resolved: float32, bfloat16, float16
    device: str  # cpu, cuda: kernels differ
    eos_ids: tuple[int, ...]  # as resolved from the generation config and tokenizer


@dataclass
class HostStats:
    """Counters the tests and logs read: loads prove that warm workers do not reload."""

    base_loads: int = 0
    adapter_loads: int = 0
    adapter_evictions: int = 0
    resident_adapters: list[str] = field(default_factory=list)


class ModelHost:
    """Holds the base model, its tokenizer and resident adapters for one device; the chunk planner's
    generator (`worker.planner.ChunkGenerator`). Once `stopping` is set, generation raises
    `ChunkInterrupted` at its next decode step (the worker is shutting down)."""

    def __init__(self, settings: Settings, *, device: str | None = None, max_adapters: int = DEFAULT_MAX_ADAPTERS):
        self.settings = settings
        self.device = pick_device(device)
        self.max_adapters = max(1, max_adapters)
        self.stats = HostStats()
        self.lock = threading.RLock()  # one chunk at a time uses the model
        self._key: BaseKey | None = None
        self._model: Any = None  # PeftModel once an adapter is loaded, else the plain model
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._adapters: OrderedDict[str, str] = OrderedDict()  # adapter hash -> PEFT adapter name
        self.base_hash: str = ""
        self.identity: ModelIdentity | None = None
        self.stopping = StopFlag()
        heap.apply()  # large tensors freed back at once (`heap`): this process holds the model

    # --- base model ---------------------------------------------------------------------------

    def base_folder(self, base: str) -> Path:
        if base == "demo":
            return prepare_demo_model(self.settings.demo_model_dir)
        self.check_allowed(base, "base model")
        return Path(base)

    def check_allowed(self, path: str, what: str) -> None:
        """Refuse a folder outside the configured model roots (after resolving `..` and links)."""
        roots = self.settings.model_roots
        if not roots:
            return
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(root.resolve()) for root in roots):
            allowed = ", ".join(str(r) for r in roots)
            raise ModelLoadError(f"{what} {path} is outside the folders this worker loads from ({allowed}); "
                                 "see --model-root")

    @property
    def max_positions(self) -> int | None:
        """The longest sequence (prompt + output) the model takes, by lm-evaluation-harness's rule
        (`harness_encoding.context_limit`); None when neither the config nor the tokenizer says."""
        return harness_context_limit(self.model.config, self.tokenizer)

    def ensure_base(self, base: str, *, dtype: str = "auto", trust_remote_code: bool = False) -> None:
        """Load the base model unless it is the one already resident."""
        folder = self.base_folder(base)
        key = BaseKey(str(folder.resolve()), dtype, trust_remote_code)
        if key == self._key:
            return
        self.unload()
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"base model {folder} is not a model folder (no config.json)")
        weights = sorted(folder.glob("*.safetensors"))
        if not weights:
            raise ModelLoadError(f"base model {folder} has no .safetensors weights; pickle weights are not loaded")
        hf_logging.disable_progress_bar()  # our own progress goes to stderr; theirs would interleave
        torch_dtype = pick_dtype(dtype, self.device)
        log.info("loading base model %s (%s) on %s", folder, torch_dtype, self.device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True
            )
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot load base model {folder}: {err}") from err
        model.to(self.device)  # type: ignore[arg-type]
        model.eval()
        tokenizer.padding_side = "left"  # generation appends on the right
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._model, self._tokenizer, self._key = model, tokenizer, key
        self.base_hash = files_sha256([folder / "config.json", *weights])
        tokenizer_files = sorted({f for pattern in _TOKENIZER_FILES for f in folder.glob(pattern) if f.is_file()})
        self.identity = ModelIdentity(
            base_hash=self.base_hash, tokenizer_hash=files_sha256(tokenizer_files),
            dtype=str(torch_dtype).removeprefix("torch."), device=self.device.type,
            eos_ids=tuple(sorted(eos_ids(model, tokenizer))),
        )
        self.stats.base_loads += 1
        if self.device.type == "cpu" and torch_dtype == torch.float32:
            # the decode-attention kernel is compiled on a machine's first use (seconds, then cached):
            # at load rather than inside the first chunk's decoding (it logs if it falls back)
            cpu_attention.available()

    def unload(self) -> None:
        self._model = self._tokenizer = self._key = None
        self._adapters.clear()
        self.stats.resident_adapters = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def model(self) -> Any:
        if self._model is None:
            raise ModelLoadError("no base model is loaded")
        return self._model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            raise ModelLoadError("no base model is loaded")
        return self._tokenizer

    @property
    def peft_model(self) -> PeftModel:
        if not isinstance(self._model, PeftModel):
            raise ModelLoadError("no adapter is loaded")
        return self._model

    # --- adapters -----------------------------------------------------------------------------

    def ensure_adapter(self, variant: str, folder: str) -> tuple[str, str]:
        """Make the adapter in `folder` resident; returns (PEFT adapter name, adapter hash)."""
        self.check_allowed(folder, f"adapter '{variant}'")
        try:
            info = inspect_adapter(variant, folder)
        except AdapterError as err:
            raise ModelLoadError(str(err)) from err
        digest = info.sha256
        if digest in self._adapters:
            self._adapters.move_to_end(digest)
            return self._adapters[digest], digest
        name = f"a{digest[:16]}"
        log.info("loading adapter %s from %s as %s", variant, folder, name)
        try:
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            if isinstance(self._model, PeftModel):
                self._model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
            else:
                self._model = PeftModel.from_pretrained(
                    self.model, str(folder), adapter_name=name, is_trainable=False
                )
                self._model.eval()
        except (RuntimeError, ValueError, OSError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelLoadError(
                f"adapter '{variant}' ({folder}) does not load onto this base model: {first}"
            ) from err
        self._adapters[digest] = name
        self.stats.adapter_loads += 1
        self._evict()
        lora_routing.install(self._model)  # after every load: an adapter may wrap new layers
        self.stats.resident_adapters = list(self._adapters.values())
        return name, digest

    def _evict(self) -> None:
        while len(self._adapters) > self.max_adapters:
            _, name = self._adapters.popitem(last=False)
            log.info("unloading least recently used adapter %s", name)
            self.peft_model.delete_adapter(name)
            self.stats.adapter_evictions += 1

    def adapted_layers(self, adapter: str) -> list[Any]:
        """The LoRA layers that `adapter` changes (for merging it and restoring exactly)."""
        from peft.tuners.lora import LoraLayer

        return [m for m in self.peft_model.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]

    # --- what the chunk planner uses (worker.planner.ChunkGenerator) ---------------------------

    def load_base(self, model: ModelConfig) -> ModelIdentity:
        self.ensure_base(model.base, dtype=model.dtype, trust_remote_code=model.trust_remote_code)
        assert self.identity is not None  # ensure_base set it
        return self.identity

    def encode(self, prompts: Sequence[str], dataset: DatasetConfig) -> list[list[int]]:
        return encode_prompts(self.tokenizer, prompts, system_prompt=dataset.system_prompt,
                              chat_template=dataset.chat_template)

    def context_limit(self) -> int | None:
        return self.max_positions

    def generate(self, rows: Sequence[GenRow], gen: GenerationConfig, inference: InferenceConfig, *,
                 variants: int, seed: int, options: DecodeOptions | None) -> tuple[list[GenResult], list[str]]:
        """`inference.use_peft_directly`: every variant in one batch (mixed); else each adapter merged in turn."""
        if gen.do_sample:
            torch.manual_seed(seed)
        notes: list[str] = []
        if inference.use_peft_directly:
            results = generate_mixed(self.model, self.tokenizer, rows, gen, batch_size=inference.batch_size,
                                     device=self.device, variants=variants, options=options, notes=notes,
                                     stop=self.stopping.is_set)
        else:
            results = generate_separate(self.peft_model, self.tokenizer, rows, gen, batch_size=inference.batch_size,
                                        device=self.device, layers_of=self.adapted_layers, options=options,
                                        notes=notes, stop=self.stopping.is_set)
        return results, notes

    def encode_pairs(self, contexts: Sequence[str], continuations: Sequence[Sequence[str]],
                     dataset: DatasetConfig) -> list[tuple[list[int], list[list[int]]]]:
        """Per context: its tokens and each continuation's, the harness's way (`harness_encoding`),
        after the chat template and system prompt are applied to the context as `dataset` says."""
        out = []
        for context, conts in zip(contexts, continuations, strict=True):
            text = prompt_text(self.tokenizer, context, system_prompt=dataset.system_prompt,
                               chat_template=dataset.chat_template)
            out.append(encode_choices(self.tokenizer, text, list(conts)))
        return out

    def encode_text(self, texts: Sequence[str]) -> list[list[int]]:
        """Each document's tokens as the harness's `tok_encode` gives them (perplexity)."""
        return [tok_encode(self.tokenizer, text) for text in texts]

    def prefix_token_id(self) -> int:
        return harness_prefix_token_id(self.tokenizer)

    def score(self, rows: Sequence[ScoreRow], inference: InferenceConfig, *, variants: int,
              options: ScoreOptions | None) -> tuple[list[ScoreResult], list[str]]:
        """Each row's continuation log-probabilities, in order, and the engine's notes. Up to
        `batch_size` contexts' worth of rows, each with all its `variants`, per forward pass; with
        `use_peft_directly` off, one series of passes per variant (never merged: the harness scores
        an adapter unmerged)."""
        options = options or ScoreOptions()
        if not inference.use_peft_directly:
            options = replace(options, mixed_batches=False)
        return score_rows(self.model, rows, options=options, capacity=inference.batch_size * max(1, variants),
                          stop=self.stopping.is_set, max_length=harness_max_length(self.context_limit()))

    def device_name(self) -> str:
        return str(self.device)

    def exclusive(self) -> AbstractContextManager[object]:
        return self.lock

    def load_summary(self) -> str:
        stats = self.stats
        return (f"model loads so far: base {stats.base_loads}, adapters {stats.adapter_loads}; "
                f"resident adapters {len(stats.resident_adapters)}")
