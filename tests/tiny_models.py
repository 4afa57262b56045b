"""Tiny random-weight causal LMs of the common architectures, with a tokenizer and PEFT adapters,
saved as real model folders (seconds on CPU, made offline in the tests).

Every model shares one byte-level BPE tokenizer (trained here on a few lines, with a ChatML
chat template) and counts a fifth of its vocabulary as EOS (in its generation config), so random
rows end at different steps. The sliding-window architectures get a window of 16 tokens: longer
than the shortest prompts' own tokens, shorter than most rows. Adapters are made the way PEFT's own
test matrix makes them: random A and B (`init_lora_weights=False`), B scaled down so outputs stay
varied.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VOCAB = 384
#: Token ids that end a row (a fifth of the vocabulary, past the special tokens).
EOS_IDS = list(range(8, 8 + VOCAB // 5))
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: Longer than the shortest prompts' own tokens, shorter than the longest rows: the window then reaches
#: back into the shared prefix for some rows and not for others.
WINDOW = 16

_TEXT = [
    "the quick brown fox jumps over the lazy dog", "what is twelve plus thirty", "lora adapters change the model",
    "a base model and its adapters side by side", "sliding windows and shared prefixes", "0123456789 + - = ?",
    "mixture of experts with a shared expert", "tokens, bytes, words and perplexity",
]


def make_tokenizer(folder: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TEXT * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return fast


def _small(**extra: Any) -> dict[str, Any]:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, tie_word_embeddings=False, **extra)


def _config(arch: str) -> Any:
    import transformers as t

    if arch == "llama":
        return t.LlamaConfig(**_small())
    if arch == "qwen2":  # q, k, v with biases
        return t.Qwen2Config(**_small())
    if arch == "qwen3":
        return t.Qwen3Config(**_small(head_dim=16))
    if arch == "qwen2_moe":
        return t.Qwen2MoeConfig(**_small(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, decoder_sparse_step=1))
    if arch == "mistral":
        return t.MistralConfig(**_small(sliding_window=WINDOW))
    if arch == "gemma":
        return t.GemmaConfig(**{**_small(head_dim=16), "tie_word_embeddings": True})
    if arch == "gemma2":
        return t.Gemma2Config(**{**_small(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16),
                                 "tie_word_embeddings": True})
    if arch == "gemma3_text":
        return t.Gemma3TextConfig(**{**_small(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                                              sliding_window_pattern=2), "tie_word_embeddings": True})
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return t.Phi3Config(**_small())
    if arch == "gpt2":  # Conv1D layers, learned positions
        return t.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=1024, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2)
    if arch == "olmo2":  # not among the engine's proven architectures: served by plain generation
        return t.Olmo2Config(**_small())
    raise ValueError(arch)


ARCHITECTURES = ["llama", "qwen2", "qwen3", "qwen2_moe", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2"]


def make_model(arch: str, folder: Path, *, seed: int = 0) -> Path:
    """A random-weight model of `arch` with the shared tokenizer, saved in `folder` (safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch)).eval()
    with torch.no_grad():  # sharper logits than the default init: fewer near-ties, varied outputs
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                param.mul_(2.0)
    model.generation_config.eos_token_id = EOS_IDS
    model.generation_config.pad_token_id = 0
    model.save_pretrained(str(folder))
    make_tokenizer(folder)
    return folder


#: The LoRA targets of each architecture: (attention, MLP) module names.
TARGETS = {
    "llama": (["q_proj", "v_proj"], ["gate_proj", "down_proj"]),
    "qwen2": (["q_proj", "k_proj", "v_proj"], ["up_proj", "down_proj"]),
    "qwen3": (["q_proj", "o_proj"], ["gate_proj", "up_proj"]),
    "qwen2_moe": (["q_proj", "v_proj"], ["shared_expert.gate_proj", "shared_expert.down_proj"]),
    "mistral": (["q_proj", "v_proj"], ["gate_proj", "down_proj"]),
    "gemma": (["q_proj", "v_proj"], ["gate_proj", "down_proj"]),
    "gemma2": (["q_proj", "v_proj"], ["gate_proj", "down_proj"]),
    "gemma3_text": (["q_proj", "v_proj"], ["gate_proj", "down_proj"]),
    "phi3": (["qkv_proj"], ["gate_up_proj", "down_proj"]),
    "gpt2": (["c_attn"], ["c_fc", "mlp.c_proj"]),
    "olmo2": (["q_proj", "v_proj"], ["gate_proj", "down_proj"]),
}
EMBEDDING = {"gpt2": "wte"}
NORM = {"gpt2": "transformer.ln_f"}


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of the matrix: a name and the LoraConfig keywords for an architecture."""

    name: str
    options: Callable[[str], dict[str, Any]]
    scale: float = 0.5
    tags: tuple[str, ...] = field(default=())


def _attn(arch: str) -> list[str]:
    return TARGETS[arch][0]


def _mlp(arch: str) -> list[str]:
    return TARGETS[arch][1]


ADAPTERS: dict[str, AdapterSpec] = {spec.name: spec for spec in [
    AdapterSpec("r1", lambda a: dict(r=1, lora_alpha=4, target_modules=_attn(a))),
    AdapterSpec("r64_rslora", lambda a: dict(r=64, lora_alpha=16, use_rslora=True, target_modules=_mlp(a)),
                scale=0.1),
    AdapterSpec("patterns", lambda a: dict(r=4, lora_alpha=8, target_modules=_attn(a) + _mlp(a),
                                           rank_pattern={_mlp(a)[0]: 2}, alpha_pattern={_attn(a)[0]: 32},
                                           layers_to_transform=[1],
                                           layers_pattern="h" if a == "gpt2" else "layers")),
    AdapterSpec("dropout_lora_bias", lambda a: dict(r=8, lora_alpha=16, lora_dropout=0.1, lora_bias=True,
                                                    target_modules=_attn(a) + _mlp(a))),
    AdapterSpec("embedding", lambda a: dict(r=4, lora_alpha=8, target_modules=[EMBEDDING.get(a, "embed_tokens")]
                                            + _attn(a))),
    AdapterSpec("lm_head", lambda a: dict(r=4, lora_alpha=8, target_modules=["lm_head"] + _attn(a))),
    AdapterSpec("saves_norm", lambda a: dict(r=4, lora_alpha=8, target_modules=_attn(a),
                                             modules_to_save=[NORM.get(a, "model.norm")])),
    AdapterSpec("dora", lambda a: dict(r=4, lora_alpha=8, use_dora=True, target_modules=_attn(a))),
]}


def make_adapter(base: Path, arch: str, spec: AdapterSpec, out: Path, *, seed: int) -> Path:
    """Save the adapter `spec` for the model in `base`, with seeded random weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    options = spec.options(arch)
    if arch == "gpt2":
        options["fan_in_fan_out"] = True
    config = LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **options)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(spec.scale)
            elif "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.5)  # a saved module that really differs
    peft_model.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)
    json.loads((out / "adapter_config.json").read_text())  # written
    return out


def plain_reference(base: Path, adapter: Path | None, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The reference: each prompt alone through plain transformers (+ PEFT with `adapter` alone),
    greedy, float32; tokens up to the first EOS (included)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            inputs = torch.tensor([ids])  # [1, prompt]
            out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=EOS_IDS, pad_token_id=0)
            new = out[0, len(ids):].tolist()
            outs.append(new[:next((i + 1 for i, t in enumerate(new) if t in EOS_IDS), len(new))])  # pads follow EOS
    return outs
