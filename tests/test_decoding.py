"""The decode engine's optimisations leave greedy float32 outputs unchanged.

On a tiny random-weight Llama with two random LoRA adapters (seconds on CPU), every optimisation is
switched on alone and all together, and compared with each prompt generated alone by plain
transformers + PEFT. Prompts share a prefix and differ in length; a fifth of the vocabulary counts
as EOS, so rows end at different steps and the batch refills. The demo-model versions of these
checks are in test_generation.py and test_pipeline.py.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from contract.config import GenerationConfig
from worker.engine import attention, kv_cache, lora_routing
from worker.engine.call import DecodeOptions
from worker.engine.prefix import common_prefix
from worker.engine.request import DecodeRequest
from worker.engine.scheduler import decode_rows

VOCAB = 256
EOS = set(range(3, 3 + VOCAB // 5))
NEW_TOKENS = 12
CPU = torch.device("cpu")


def request(gen: GenerationConfig, eos: set[int] = EOS) -> DecodeRequest:
    return DecodeRequest(gen, eos, 0, CPU)


@pytest.fixture(scope="module")
def tiny() -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0,
                         eos_token_id=None, bos_token_id=1)
    model = LlamaForCausalLM(config).eval()
    peft = None
    for i, (rank, targets) in enumerate([(4, ["q_proj", "v_proj"]), (8, ["gate_proj", "up_proj", "down_proj"])]):
        lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False,
                          lora_dropout=0.0, task_type="CAUSAL_LM")
        torch.manual_seed(10 + i)
        if peft is None:
            peft = get_peft_model(model, lora, adapter_name=f"ad{i}")
        else:
            peft.add_adapter(f"ad{i}", lora)
    assert peft is not None
    peft.eval()
    assert lora_routing.install(peft)
    rng = random.Random(1)
    prefix = [rng.randrange(VOCAB // 5 + 3, VOCAB) for _ in range(10)]
    prompts = [prefix + [rng.randrange(VOCAB // 5 + 3, VOCAB) for _ in range(rng.randrange(1, 9))]
               for _ in range(9)]
    rows = [(p, name) for p in prompts for name in ("__base__", "ad0", "ad1")]

    def alone(ids: list[int], name: str) -> list[int]:
        inputs = torch.tensor([ids])
        kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=sorted(EOS))
        with torch.inference_mode():
            if name == "__base__":
                with peft.disable_adapter():
                    out = peft.generate(input_ids=inputs, **kwargs)
            else:
                peft.set_adapter(name)
                out = peft.generate(input_ids=inputs, **kwargs)
        new = out[0, len(ids):].tolist()
        cut = next((i + 1 for i, t in enumerate(new) if t in EOS), len(new))  # generate pads after EOS
        return new[:cut]

    return {"model": peft, "rows": rows, "reference": [alone(p, n) for p, n in rows]}


ALL_OFF = DecodeOptions(capacity=6, refill=False, share_prefix=False, route_lora=False, last_logits_only=False,
                        pad_output_rows=False, in_place_attention=False, onednn_linear=False,
                        govern_threads=False, trim_heap=False)
VARIANTS = {
    "none": ALL_OFF,
    "refill": replace(ALL_OFF, refill=True),
    "shared prefix, copied for attention": replace(ALL_OFF, share_prefix=True),
    "shared prefix, attended in place": replace(ALL_OFF, share_prefix=True, in_place_attention=True),
    "routed LoRA": replace(ALL_OFF, route_lora=True),
    "last logits only": replace(ALL_OFF, last_logits_only=True),
    "output projection on padded rows": replace(ALL_OFF, pad_output_rows=True),
    "float32 linear layers through oneDNN": replace(ALL_OFF, onednn_linear=True),
    "threads governed": replace(ALL_OFF, govern_threads=True),
    "heap trimmed after each prefill": replace(ALL_OFF, trim_heap=True),
    "all": DecodeOptions(capacity=6),
    "all, one row at a time": DecodeOptions(capacity=1),
    "all, everything in one batch": DecodeOptions(capacity=100),
}


@pytest.mark.parametrize("label", list(VARIANTS))
def test_each_optimisation_leaves_outputs_equal_to_single_prompt_generation(tiny: dict[str, Any], label: str) -> None:
    rows = tiny["rows"]
    got = decode_rows(tiny["model"], [p for p, _ in rows], request(GenerationConfig(max_new_tokens=NEW_TOKENS)),
                      options=VARIANTS[label], adapter_names=[n for _, n in rows])
    assert got == tiny["reference"]


def test_threads_switched_at_every_step_leave_outputs_equal(tiny: dict[str, Any],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`contention.Governor` made to switch between 1 and 2 threads at every step (as a busy machine
    would, at most once a window): the tokens are those of single-prompt generation."""
    from worker.engine import contention

    monkeypatch.setattr(contention, "WINDOW", 0.0)
    monkeypatch.setattr(contention, "LOW", 1e9)  # always "taken" on 2 threads
    monkeypatch.setattr(contention, "HIGH", -1.0)  # always "free" on 1
    switched: list[int] = []
    monkeypatch.setattr(contention.Governor, "_set",
                        lambda self, n, share: (switched.append(n), torch.set_num_threads(n)))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows = tiny["rows"]
        got = decode_rows(tiny["model"], [p for p, _ in rows], request(GenerationConfig(max_new_tokens=NEW_TOKENS)),
                          options=DecodeOptions(capacity=6), adapter_names=[n for _, n in rows])
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    assert got == tiny["reference"]
    assert switched[:4] == [1, 2, 1, 2] and len(switched) > NEW_TOKENS


def test_the_rows_really_differ(tiny: dict[str, Any]) -> None:
    """Otherwise the equalities above prove little: adapters change outputs, rows end at different steps."""
    reference = tiny["reference"]
    assert len({len(r) for r in reference}) > 3
    assert sum(reference[i] != reference[i + 1] for i in range(0, len(reference), 3)) >= 5


def test_a_batch_without_adapters_samples_reproducibly_from_its_seed(tiny: dict[str, Any]) -> None:
    """Sampling draws from torch's generator: the same seed gives the same tokens, another seed others;
    a nucleus that holds only the most likely token gives the greedy tokens back."""
    prompts = [p for p, n in tiny["rows"] if n == "__base__"]

    def decode(gen: GenerationConfig, seed: int = 0) -> list[list[int]]:
        torch.manual_seed(seed)
        return decode_rows(tiny["model"], prompts, request(gen), options=DecodeOptions(capacity=4))

    sampling = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=True, temperature=0.8, top_p=0.9)
    with tiny["model"].disable_adapter():
        greedy = decode(GenerationConfig(max_new_tokens=NEW_TOKENS))
        sampled, again, other = decode(sampling, seed=0), decode(sampling, seed=0), decode(sampling, seed=1)
        narrow = decode(replace(sampling, top_p=1e-6), seed=2)
    assert greedy == [r for r, (_, n) in zip(tiny["reference"], tiny["rows"]) if n == "__base__"]
    assert all(1 <= len(s) <= NEW_TOKENS for s in sampled)
    assert sampled == again
    assert sampled != other
    assert sampled != greedy
    assert narrow == greedy


def test_a_refill_joins_sampled_tokens_not_logits(tiny: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """At a refill the rows in flight have sampled their next tokens (and dropped their [rows, vocab]
    logits) before the joining rows' prefill runs, and the joining rows theirs before they join: no
    logits are held through a prefill, concatenated or reordered (a run's memory peaked there). The
    tokens are those of single-prompt generation, greedy; sampling stays reproducible from its seed."""
    from worker.engine import scheduler
    from worker.engine.batch import Batch

    seen: list[tuple[str, bool, bool]] = []
    prefill, absorb = scheduler._prefill, Batch.absorb

    def watched_prefill(call: Any, rows: list[int], reserve: int = 0, into: Batch | None = None) -> Batch:
        if into is not None:
            seen.append(("prefill", into.logits is None, into.chosen is not None))
        return prefill(call, rows, reserve=reserve, into=into)

    def watched_absorb(self: Batch, fresh: Batch) -> None:
        seen.append(("absorb", self.logits is None and fresh.logits is None,
                     self.chosen is not None and fresh.chosen is not None))
        absorb(self, fresh)

    monkeypatch.setattr(scheduler, "_prefill", watched_prefill)
    monkeypatch.setattr(Batch, "absorb", watched_absorb)
    rows = tiny["rows"]
    greedy = GenerationConfig(max_new_tokens=NEW_TOKENS)
    got = decode_rows(tiny["model"], [p for p, _ in rows], request(greedy), options=DecodeOptions(capacity=6),
                      adapter_names=[n for _, n in rows])
    assert got == tiny["reference"]
    assert [s[0] for s in seen].count("absorb") >= 3  # it did refill
    assert all(dropped and chosen for _, dropped, chosen in seen), seen

    sampling = replace(greedy, do_sample=True, temperature=0.8)
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(decode_rows(tiny["model"], [p for p, _ in rows], request(sampling),
                                 options=DecodeOptions(capacity=6), adapter_names=[n for _, n in rows]))
    assert draws[0] == draws[1] and draws[0] != got


def _shuffled_logits(probs: list[float], rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [rows, len(probs)] whose softmax is `probs`, put at positions shuffled per row, and the
    positions [rows, len(probs)] where `probs[k]` went in each row."""
    gen = torch.Generator().manual_seed(seed)
    where = torch.stack([torch.randperm(len(probs), generator=gen) for _ in range(rows)])  # [rows, vocab]
    logits = torch.empty(rows, len(probs)).scatter_(1, where, torch.tensor(probs).log().expand(rows, -1))
    return logits, where


NUCLEUS_PROBS = [0.5, 0.3, 0.15, 0.05]


@pytest.mark.parametrize(("top_p", "nucleus"), [(0.7, 2), (0.85, 3), (1.0, 4)])
def test_top_p_samples_only_from_the_nucleus_in_proportion(top_p: float, nucleus: int) -> None:
    """Probabilities 0.5, 0.3, 0.15, 0.05: top-p keeps the most likely tokens until their sum reaches
    top_p (0.7: two tokens, 0.85: three), renormalised; 4000 draws hit every kept token and no other."""
    from worker.engine.sampling import SamplingParams, sample

    draws = 4000
    logits, where = _shuffled_logits(NUCLEUS_PROBS, draws, seed=5)
    torch.manual_seed(0)
    chosen = sample(logits, params=SamplingParams.from_config(GenerationConfig(do_sample=True, top_p=top_p)))
    rank = (where == chosen[:, None]).int().argmax(dim=1)  # [draws]: which of NUCLEUS_PROBS was drawn
    counts = torch.bincount(rank, minlength=len(NUCLEUS_PROBS)).tolist()
    assert all(c > 0 for c in counts[:nucleus]) and all(c == 0 for c in counts[nucleus:]), counts
    kept = sum(NUCLEUS_PROBS[:nucleus])
    for k in range(nucleus):
        assert abs(counts[k] / draws - NUCLEUS_PROBS[k] / kept) < 0.03, (k, counts)


@pytest.mark.parametrize("gen", [GenerationConfig(do_sample=True, top_p=1e-6),
                                 GenerationConfig(do_sample=True, temperature=1e-4),
                                 GenerationConfig(do_sample=False, temperature=5.0, top_p=0.5)],
                         ids=["tiny top_p", "tiny temperature", "greedy"])
def test_sampling_that_leaves_one_token_is_the_argmax(gen: GenerationConfig) -> None:
    """Logits 0.01 apart: at temperature 1e-4 the runner-up has probability e^-100 of the winner."""
    from worker.engine.sampling import SamplingParams, sample

    rows, vocab = 500, 50
    rng = torch.Generator().manual_seed(7)
    logits = torch.stack([torch.randperm(vocab, generator=rng) for _ in range(rows)]).float() * 0.01
    torch.manual_seed(0)
    assert torch.equal(sample(logits, params=SamplingParams.from_config(gen)), logits.argmax(dim=-1))
    assert len(set(logits.argmax(dim=-1).tolist())) > vocab // 2  # the winner moves: not one token every time


def test_common_prefix_leaves_every_prompt_a_token() -> None:
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert common_prefix([[1, 2, 3]]) == 2
    assert common_prefix([[1, 2], [3, 4]]) == 0
    assert common_prefix([]) == 0


def test_segments_are_runs_of_one_adapter() -> None:
    assert lora_routing.segments(["a", "a", "b", "__base__", "__base__"]) == (
        ("a", 0, 2), ("b", 2, 3), ("__base__", 3, 5))
    assert lora_routing.segments(["a", "b", "a"]) == (("a", 0, 1), ("b", 1, 2), ("a", 2, 3))
    assert lora_routing.segments([]) == ()


def test_layers_outside_a_route_behave_as_peft(tiny: dict[str, Any]) -> None:
    """Routing changes nothing outside `route`: the active-adapter path still gives PEFT's result."""
    model = tiny["model"]
    ids = torch.tensor([tiny["rows"][0][0]])
    model.set_adapter("ad1")
    with torch.inference_mode():
        routed = model(input_ids=ids).logits
        with lora_routing.route(["ad1"]):
            inside = model(input_ids=ids).logits
        plain = model(input_ids=ids, adapter_names=["ad1"]).logits
    assert torch.equal(routed, plain) and torch.equal(inside, plain)



def test_a_model_with_a_lora_variant_runs_one_pass_per_variant() -> None:
    """PEFT refuses to mix DoRA (a LoRA variant) with other rows in one batch, and routing does not
    handle it: `install` says so (`mixing`), and decoding runs a pass per variant instead, with the same
    tokens as each prompt alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                         pad_token_id=0, eos_token_id=None, bos_token_id=1)).eval()
    dora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True,
                      init_lora_weights=False, task_type="CAUSAL_LM")
    peft = get_peft_model(model, dora, adapter_name="d").eval()
    assert not lora_routing.install(peft) and lora_routing.mixing(peft).mode == "per_variant"
    prompts = [[40, 41, 42, 43, 50 + i] for i in range(3)]
    names = ["__base__", "d", "d"]
    got = decode_rows(peft, prompts, request(GenerationConfig(max_new_tokens=5), set()),
                      options=DecodeOptions(capacity=4), adapter_names=names)
    with torch.inference_mode():
        for ids, name, tokens in zip(prompts, names, got):
            kwargs = dict(input_ids=torch.tensor([ids]), max_new_tokens=5, do_sample=False, pad_token_id=0)
            if name == "__base__":
                with peft.disable_adapter():
                    alone = peft.generate(**kwargs)
            else:
                peft.set_adapter(name)
                alone = peft.generate(**kwargs)
            assert alone[0, len(ids):].tolist() == tokens


@pytest.mark.parametrize("own_pages", [kv_cache.OWN_PAGES, 0], ids=["heap", "own-pages"])
def test_the_cache_kept_in_place_hands_attention_what_a_concatenated_cache_would(monkeypatch: Any,
                                                                                 own_pages: int) -> None:
    """`_RowsLayer` writes steps, finished rows, trims and joining rows in place (moving or growing its
    buffer when it runs out of room); whatever it does, attention must see exactly the keys and values
    of a plain cache that concatenates, pads on the left and indexes, with the shared prefix in front.
    Its buffers in the C heap (these small ones) or in pages of their own (`kv_cache.zeros`)."""
    monkeypatch.setattr(kv_cache, "OWN_PAGES", own_pages)
    monkeypatch.setattr(kv_cache.RowsLayer, "SPARE", 1)  # out of room often: every move and growth path runs
    monkeypatch.setattr(kv_cache.RowsLayer, "GROWTH", 0)
    rng = random.Random(3)
    gen = torch.Generator().manual_seed(3)
    heads, dim, plen = 2, 4, 3
    prefix = (torch.randn(3, heads, plen, dim, generator=gen), torch.randn(3, heads, plen, dim, generator=gen))

    def whole(own: torch.Tensor, pick: list[int], which: int) -> torch.Tensor:
        return torch.cat([prefix[which][torch.tensor(pick, dtype=torch.long)], own], dim=2)

    def pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
        return torch.cat([t.new_zeros(t.shape[0], heads, width - t.shape[2], dim), t], dim=2)

    for case in range(20):
        rows = rng.randrange(1, 5)
        pick = [rng.randrange(3) for _ in range(rows)]
        layer = kv_cache.RowsLayer(prefix if case % 2 else None, pick, reserve=rng.randrange(rows, 9))
        first = (torch.randn(rows, heads, rng.randrange(1, 6), dim, generator=gen),) * 2
        ref_k, ref_v = first[0], first[0] * 2
        layer.update(ref_k, ref_v)
        for _ in range(25):
            op = rng.choice(["step", "step", "select", "trim", "join"])
            if op == "select" and ref_k.shape[0] > 1:
                idx = sorted(rng.sample(range(ref_k.shape[0]), rng.randrange(1, ref_k.shape[0] + 1)))
                rng.shuffle(idx)
                index = torch.tensor(idx)
                layer.batch_select_indices(index)
                ref_k, ref_v, pick = ref_k[index], ref_v[index], [pick[i] for i in idx]
            elif op == "trim" and ref_k.shape[2] > 1:
                cut = rng.randrange(1, ref_k.shape[2])
                layer.trim(cut)
                ref_k, ref_v = ref_k[:, :, cut:], ref_v[:, :, cut:]
            elif op == "join" and ref_k.shape[0] < 8:
                joining = rng.randrange(1, 9 - ref_k.shape[0])
                more = [rng.randrange(3) for _ in range(joining)]
                k = torch.randn(joining, heads, rng.randrange(1, 8), dim, generator=gen)
                layer.open(more, k.shape[2])
                got_k, got_v = layer.update(k, k * 2)
                expect_k = whole(k, more, 0) if layer.prefix is not None else k
                assert torch.equal(got_k, expect_k) and torch.equal(got_v, expect_k * 2 if layer.prefix is None
                                                                     else whole(k * 2, more, 1))
                assert layer.get_seq_length() == layer.plen + k.shape[2]
                layer.commit()
                width = max(ref_k.shape[2], k.shape[2])
                ref_k = torch.cat([pad_left(ref_k, width), pad_left(k, width)])
                ref_v = torch.cat([pad_left(ref_v, width), pad_left(k * 2, width)])
                pick = pick + more
            else:
                k = torch.randn(ref_k.shape[0], heads, 1, dim, generator=gen)
                in_place = attention._ACTIVE.set(case % 4 == 1)  # as under `attention.in_place`
                try:
                    got_k, got_v = layer.update(k, k * 2)
                    handoff = attention._PENDING.get()
                finally:
                    attention._ACTIVE.reset(in_place)
                    attention._PENDING.set(None)
                ref_k, ref_v = torch.cat([ref_k, k], dim=2), torch.cat([ref_v, k * 2], dim=2)
                if handoff is not None:  # the own columns in place, the prefix beside them
                    assert case % 4 == 1 and got_k is handoff.keys and got_v is handoff.values
                    assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
                    got_k, got_v = attention.assemble(handoff)
                    assert torch.equal(got_k, whole(ref_k, pick, 0)) and torch.equal(got_v, whole(ref_v, pick, 1))
                elif layer.prefix is not None:
                    assert case % 4 != 1
                    assert torch.equal(got_k, whole(ref_k, pick, 0)) and torch.equal(got_v, whole(ref_v, pick, 1))
                else:
                    assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
            assert layer.keys is not None and layer.values is not None
            assert torch.equal(layer.keys, ref_k) and torch.equal(layer.values, ref_v), (case, op)
            assert layer.pick == pick and layer.get_seq_length() == layer.plen + ref_k.shape[2]


@pytest.mark.parametrize("own_pages", [kv_cache.OWN_PAGES, 0], ids=["heap", "own-pages"])
def test_decoding_with_a_cache_that_is_always_out_of_room_is_unchanged(tiny: dict[str, Any], monkeypatch: Any,
                                                                       own_pages: int) -> None:
    monkeypatch.setattr(kv_cache, "OWN_PAGES", own_pages)
    monkeypatch.setattr(kv_cache.RowsLayer, "SPARE", 0)
    monkeypatch.setattr(kv_cache.RowsLayer, "GROWTH", 0)
    rows = tiny["rows"]
    got = decode_rows(tiny["model"], [p for p, _ in rows], request(GenerationConfig(max_new_tokens=NEW_TOKENS)),
                      options=DecodeOptions(capacity=7), adapter_names=[n for _, n in rows])
    assert got == tiny["reference"]


@pytest.mark.parametrize("rows", [1, 7, 8, 13, 16])
def test_the_output_projection_on_padded_rows_computes_the_same_logits(rows: int) -> None:
    from worker.engine import cpu_head

    head = torch.nn.Linear(16, 40, bias=False)
    x = torch.randn(rows, 1, 16)
    expected = head(x)
    model = type("M", (), {"get_output_embeddings": lambda self: head})()
    cpu_head.pad_output_rows(model)
    assert torch.equal(head(x), expected)  # outside `decode_rows`: a plain nn.Linear
    with cpu_head.padding_rows(model, True):
        got = head(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected)


def test_top_p_never_draws_outside_the_nucleus_with_a_fixed_generator() -> None:
    """Probabilities 0.4, 0.3, 0.2, 0.1 (and a long tail of nearly nothing) at top_p 0.6: only the
    two most likely tokens are ever drawn, the same draws again from the same generator seed; greedy
    is the argmax whatever the generator. `sample` takes its parameters by keyword only."""
    from worker.engine.sampling import SamplingParams, sample

    vocab, draws = 32, 3000
    probs = torch.full((vocab,), 1e-9)
    probs[[7, 3, 20, 11]] = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().expand(draws, -1).contiguous()  # [draws, vocab]
    nucleus = SamplingParams(temperature=1.0, top_p=0.6, do_sample=True)

    def draw(seed: int) -> torch.Tensor:
        return sample(logits, params=nucleus, generator=torch.Generator().manual_seed(seed))

    chosen = draw(0)
    assert set(chosen.tolist()) == {7, 3}
    assert torch.equal(chosen, draw(0)) and not torch.equal(chosen, draw(1))
    assert abs((chosen == 7).float().mean().item() - 0.4 / 0.7) < 0.04  # renormalised within the nucleus
    every = sample(logits, params=replace(nucleus, top_p=1.0), generator=torch.Generator().manual_seed(0))
    assert {7, 3, 20, 11} <= set(every.tolist())  # without a nucleus the others are drawn too
    greedy = sample(logits, params=SamplingParams.from_config(GenerationConfig(do_sample=False, top_p=0.6)),
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, logits.argmax(dim=-1))
    with pytest.raises(TypeError):
        sample(logits, nucleus)  # type: ignore[misc]


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the process's resident memory from /proc")
def test_cache_buffers_in_pages_of_their_own_are_zeros_and_go_back_to_the_system_when_freed() -> None:
    """A big CPU buffer (a cache layer's keys) is zeros in its own pages, which the process no longer
    holds once it is freed; a small one, or one on another device, is an ordinary tensor."""
    like = torch.ones(1, dtype=torch.float32)
    small = kv_cache.zeros((3, 4), like)
    assert small.shape == (3, 4) and small.dtype == torch.float32 and not small.any()
    before = _rss_mib()
    big = kv_cache.zeros((64, 2, 1024, 64), like)  # 32 MiB
    assert big.shape == (64, 2, 1024, 64) and big.dtype == torch.float32 and big.is_contiguous()
    assert not big.any()
    big.fill_(1.5)  # written: resident
    view = big[1:, :, 3:]  # a view keeps the pages alive
    del big
    assert float(view.sum()) == 1.5 * view.numel()
    held = _rss_mib()
    assert held - before > 24
    del view
    # unmapped at once, where the heap keeps what it frees; measured against the RSS with it held, as
    # other allocations of the process (a heap trimmed by an earlier decode call faulting its pages
    # back in) may move it by a few MiB meanwhile
    assert held - _rss_mib() > 24
    half = kv_cache.zeros((8,), torch.ones(1, dtype=torch.float16))
    assert half.dtype == torch.float16 and not half.any()


def test_a_cache_buffer_the_system_will_not_map_comes_from_the_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(kv_cache.mmap, "mmap", refused)
    got = kv_cache.zeros((16, 3, 64, 64), torch.ones(1))
    assert got.shape == (16, 3, 64, 64) and not got.any()


@pytest.mark.parametrize("hidden", [64, 576])
def test_routed_products_give_pefts_mixed_batch_bit_for_bit(hidden: int) -> None:
    """`route`'s LoRA products (`mm` on 2-D views of the rows, scaling and sum in place) are the
    operations PEFT's `adapter_names` runs on the same values: the logits are equal, not close, for
    a prefill and a one-token step, at a tiny width and at the demo model's (576, where MKL takes
    its large kernels); an adapter with a LoRA bias takes the `F.linear` path beside them."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=1,
                         num_attention_heads=hidden // 64, num_key_value_heads=1, vocab_size=VOCAB,
                         pad_token_id=0, eos_token_id=None, bos_token_id=1)
    model = LlamaForCausalLM(config).eval()
    peft: Any = None
    adapters = [(4, ["q_proj", "v_proj"], False), (16, ["gate_proj", "up_proj", "down_proj", "o_proj"], False),
                (8, ["q_proj", "down_proj"], True)]
    for i, (rank, targets, bias) in enumerate(adapters):
        lora = LoraConfig(r=rank, lora_alpha=3 * rank, target_modules=targets, init_lora_weights=False,
                          lora_bias=bias, task_type="CAUSAL_LM")
        torch.manual_seed(20 + i)
        peft = get_peft_model(model, lora, adapter_name=f"ad{i}") if peft is None else peft
        if i:
            peft.add_adapter(f"ad{i}", lora)
    peft.eval()
    assert lora_routing.install(peft)
    names = ["__base__"] * 2 + ["ad0"] * 3 + ["ad1"] * 1 + ["ad2"] * 2
    for tokens in (7, 1):
        ids = torch.randint(3, VOCAB, (len(names), tokens), generator=torch.Generator().manual_seed(tokens))
        with torch.inference_mode():
            with lora_routing.route(names):
                routed = peft(input_ids=ids).logits
            mixed = peft(input_ids=ids, adapter_names=names).logits
        assert torch.equal(routed, mixed), (hidden, tokens)
