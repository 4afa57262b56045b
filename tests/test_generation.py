"""The generation strategies on the real model, below the queue: merged passes restore the weights
bit for bit, finished rows are cut at EOS or a stop string, and the prompt is encoded as documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.config import GenerationConfig
from contract.settings import Settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def host(demo_model: Path, test_adapters: dict[str, Path], settings: Settings):  # type: ignore[no-untyped-def]
    from worker.model_host import ModelHost

    host = ModelHost(settings, device="cpu")
    host.ensure_base("demo", dtype="float32")
    names = {v: host.ensure_adapter(v, str(p))[0] for v, p in test_adapters.items()}
    return host, names


def test_merged_passes_restore_the_base_weights_exactly(host) -> None:  # type: ignore[no-untyped-def]
    import torch

    from worker.engine.generation import GenRow, generate_separate
    from worker.prompts import encode_prompts

    model_host, names = host
    before = {k: v.detach().clone() for k, v in model_host.peft_model.named_parameters() if "lora_" not in k}
    ids = encode_prompts(model_host.tokenizer, ["What is 2 plus 3?", "Name a colour."], system_prompt=None,
                         chat_template=True)
    rows = [GenRow(tuple(i), a) for i in ids for a in (None, *names.values())]
    results = generate_separate(model_host.peft_model, model_host.tokenizer, rows, GenerationConfig(max_new_tokens=4),
                                batch_size=4, device=model_host.device, layers_of=model_host.adapted_layers)
    assert len(results) == len(rows)
    after = dict(model_host.peft_model.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not layer.merged for layer in model_host.adapted_layers(next(iter(names.values()))))


def test_stop_strings_and_eos_end_rows(host) -> None:  # type: ignore[no-untyped-def]
    from worker.engine.generation import GenRow, generate_mixed
    from worker.prompts import encode_prompts

    model_host, names = host
    ids = encode_prompts(model_host.tokenizer, ["List three fruits, one per line."], system_prompt=None,
                         chat_template=True)
    free = generate_mixed(model_host.model, model_host.tokenizer, [GenRow(tuple(ids[0]), None)],
                          GenerationConfig(max_new_tokens=40), batch_size=1, device=model_host.device)[0]
    assert "\n" in free.text, free.text  # the model writes several lines when allowed to
    stopped = generate_mixed(model_host.model, model_host.tokenizer, [GenRow(tuple(ids[0]), None)],
                             GenerationConfig(max_new_tokens=40, stop=("\n",)), batch_size=1,
                             device=model_host.device)[0]
    assert stopped.finish_reason == "stop" and "\n" not in stopped.text
    assert free.text.startswith(stopped.text)
    assert stopped.output_tokens < 40
    short = generate_mixed(model_host.model, model_host.tokenizer, [GenRow(tuple(ids[0]), None)],
                           GenerationConfig(max_new_tokens=2), batch_size=1, device=model_host.device)[0]
    assert short.finish_reason == "length" and short.output_tokens == 2


def test_prompt_encoding_uses_exactly_the_documented_messages(host) -> None:  # type: ignore[no-untyped-def]
    from worker.prompts import encode_prompts, prompt_text

    model_host, _ = host
    tokenizer = model_host.tokenizer
    with_system = prompt_text(tokenizer, "Hi", system_prompt="Be brief.", chat_template=True)
    expected = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Hi"}],
                                             add_generation_prompt=True, tokenize=False)
    assert with_system == expected
    assert prompt_text(tokenizer, "Hi", system_prompt=None, chat_template=False) == "Hi"
    ids = encode_prompts(tokenizer, ["Hi"], system_prompt="Be brief.", chat_template=True)[0]
    assert ids == tokenizer(expected, add_special_tokens=False)["input_ids"]


def test_a_warm_host_reuses_model_and_adapters(host, test_adapters: dict[str, Path]) -> None:  # type: ignore
    model_host, names = host
    loads = (model_host.stats.base_loads, model_host.stats.adapter_loads)
    model_host.ensure_base("demo", dtype="float32")
    assert model_host.ensure_adapter("attn", str(test_adapters["attn"]))[0] == names["attn"]
    assert (model_host.stats.base_loads, model_host.stats.adapter_loads) == loads


def test_finished_rows_leave_the_batch_without_changing_outputs(host) -> None:  # type: ignore[no-untyped-def]
    """The decode loop drops rows at EOS; the others go on exactly as with transformers' generate,
    which keeps every row to the end (one batch, mixed adapters, no other optimisation)."""
    import torch

    from worker.engine.call import DecodeOptions
    from worker.engine.generation import eos_ids
    from worker.engine.request import DecodeRequest
    from worker.engine.scheduler import decode_rows
    from worker.prompts import encode_prompts

    model_host, names = host
    tokenizer, model = model_host.tokenizer, model_host.model
    prompts = ["What is 2 plus 3?", "Write a long story about a dragon.", "Say yes.", "List four fruits."]
    ids = encode_prompts(tokenizer, prompts, system_prompt=None, chat_template=True)
    adapters = ["__base__", names["attn"], names["mlp"], "__base__"]
    eos = eos_ids(model, tokenizer)
    options = DecodeOptions(capacity=len(ids), refill=False, share_prefix=False, route_lora=False,
                            last_logits_only=False)
    request = DecodeRequest(GenerationConfig(max_new_tokens=30), eos, tokenizer.pad_token_id, model_host.device)
    ours = decode_rows(model, ids, request, options=options, adapter_names=adapters)
    assert len({len(t) for t in ours}) > 1  # rows did finish at different steps
    width = max(len(i) for i in ids)
    padded = torch.tensor([[tokenizer.pad_token_id] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    with torch.inference_mode():
        theirs = model.generate(input_ids=padded, attention_mask=mask, max_new_tokens=30, do_sample=False,
                                temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id,
                                adapter_names=adapters)[:, width:].tolist()
    for mine, reference in zip(ours, theirs):
        assert reference[:len(mine)] == mine
        assert len(mine) == 30 or mine[-1] in eos


def test_every_optimisation_on_the_demo_model_leaves_outputs_unchanged(host) -> None:  # type: ignore
    """Refill, the shared prefix, routed LoRA and last-position logits, each alone and together, on
    the real model with two adapters and a system prompt: the same tokens as with none of them."""
    from dataclasses import replace

    from worker.engine.call import DecodeOptions
    from worker.engine.generation import eos_ids
    from worker.engine.prefix import common_prefix
    from worker.engine.request import DecodeRequest
    from worker.engine.scheduler import decode_rows
    from worker.prompts import encode_prompts

    model_host, names = host
    tokenizer, model = model_host.tokenizer, model_host.model
    prompts = ["What is 2 plus 3?", "Name a colour.", "Write a haiku about rain.", "What is 17 plus 25?",
               "Say yes.", "Count to five."]
    ids = encode_prompts(tokenizer, prompts, system_prompt="You answer briefly.", chat_template=True)
    assert common_prefix(ids) >= 8
    rows = [(i, a) for i in ids for a in ("__base__", names["attn"], names["mlp"])]
    off = DecodeOptions(capacity=6, refill=False, share_prefix=False, route_lora=False, last_logits_only=False)

    def run(options: DecodeOptions) -> list[list[int]]:
        request = DecodeRequest(GenerationConfig(max_new_tokens=20), eos_ids(model, tokenizer),
                                tokenizer.pad_token_id, model_host.device)
        return decode_rows(model, [i for i, _ in rows], request, options=options, adapter_names=[a for _, a in rows])

    reference = run(off)
    assert len({len(t) for t in reference}) > 1
    for label, options in [("refill", replace(off, refill=True)), ("prefix", replace(off, share_prefix=True)),
                           ("routed", replace(off, route_lora=True)),
                           ("last logits", replace(off, last_logits_only=True)), ("all", DecodeOptions(capacity=6))]:
        assert run(options) == reference, label
