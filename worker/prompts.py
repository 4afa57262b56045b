"""Wrapping rendered prompts in the tokenizer's chat template and tokenizing them, once per chunk."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase


def chat_messages(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
    """Exactly the messages DESIGN.md fixes: an optional system message, then the user's prompt."""
    messages = [{"role": "user", "content": prompt}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def prompt_text(
    tokenizer: PreTrainedTokenizerBase, prompt: str, *, system_prompt: str | None, chat_template: bool
) -> str:
    """The exact text the model sees, before tokenization."""
    if chat_template and tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            chat_messages(prompt, system_prompt), add_generation_prompt=True, tokenize=False
        )
        return str(text)
    if system_prompt:
        return f"{system_prompt}\n\n{prompt}"
    return prompt


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    system_prompt: str | None,
    chat_template: bool,
) -> list[list[int]]:
    """Token ids of every prompt; the chat template already holds its special tokens."""
    templated = bool(chat_template and tokenizer.chat_template)
    texts = [prompt_text(tokenizer, p, system_prompt=system_prompt, chat_template=chat_template) for p in prompts]
    encoded = tokenizer(texts, add_special_tokens=not templated)
    return [list(ids) for ids in encoded["input_ids"]]
