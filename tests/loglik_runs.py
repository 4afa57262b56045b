"""Hand-made stored runs of the log-likelihood tasks (`task: choice`, `task: perplexity`): the rows a
worker writes (examples with choices, `generations` rows finished `scored`, `loglikelihoods`), put
straight into a database, so reports and views are checked against numbers worked out by hand.

Choice (variants base and `ad`; the comments give each variant's acc / acc_norm pick):
    ex  choices          gold  base logprobs      ad logprobs
    0   a, bb            1     -1.0, -2.0 (0/0*)  -2.0, -1.5 (1/1)     * per char -1.0, -1.0: a tie, the first wins
    1   cat, c           0     -3.0, -2.0 (1/0)   -3.0, -2.5 (1/0)
    2   x, y, zz         2     -5, -4, -1 (2/2)   -1, -4, -1 (0*/2)    * a tie of logprobs: the first wins
    3   p, q             0     -0.5, -1.0 (0/0)   -0.7, -0.6 (1/1)
Perplexity (variants base and `ad`): three documents, base log-likelihoods -20, -15, -10 and ad's -18, -16, -8.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from db.enums import FinishReason
from db.outputs import NewGeneration, insert_generations
from db.runs import NewExample, NewVariant, create_run
from db.scores import NewScore, insert_scores

ADAPTER = "ad"


@dataclass(frozen=True)
class ChoiceExample:
    choices: tuple[str, ...]
    gold: int
    base: tuple[float, ...]
    ad: tuple[float, ...]


CHOICE_EXAMPLES = [
    ChoiceExample(("a", "bb"), 1, (-1.0, -2.0), (-2.0, -1.5)),
    ChoiceExample(("cat", "c"), 0, (-3.0, -2.0), (-3.0, -2.5)),
    ChoiceExample(("x", "y", "zz"), 2, (-5.0, -4.0, -1.0), (-1.0, -4.0, -1.0)),
    ChoiceExample(("p", "q"), 0, (-0.5, -1.0), (-0.7, -0.6)),
]

#: (text, base log-likelihood, ad's): one ASCII document, one with two-byte characters, one of short words.
DOCUMENTS = [("one two three", -20.0, -18.0), ("héllo wörld", -15.0, -16.0), ("a b c d e f", -10.0, -8.0)]

CHOICE_CONFIG = {"name": "mc", "task": "choice", "model": {"base": "demo", "adapters": {ADAPTER: "/ad"}},
                 "dataset": {"path": "mc.jsonl", "prompt": "Q{{ n }}:", "choices": "{{ options }}",
                             "answer": "{{ label }}"}}
PERPLEXITY_CONFIG = {"name": "docs", "task": "perplexity", "model": {"base": "demo", "adapters": {ADAPTER: "/ad"}},
                     "dataset": {"path": "docs.jsonl", "text": "{{ text }}"}}


def first_argmax(values: tuple[float, ...]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _generation(run_id: int, idx: int, variant: str, output: str, prediction: str | None,
                correct: bool | None) -> NewGeneration:
    return NewGeneration(run_id=run_id, example_idx=idx, variant=variant, chunk_id=0, output=output,
                         prediction=prediction, correct=correct, prompt_tokens=3, output_tokens=0,
                         finish_reason=FinishReason.SCORED.value, base_model_hash="b" * 64,
                         adapter_hash=None if variant == "base" else "a" * 64)


def _run(session: Session, config: dict, examples: list[NewExample], dataset: str) -> int:
    return create_run(session, name=config["name"], config=config, config_path=None, base_model="demo",
                      dataset_path=dataset, dataset_sha256=dataset[0] * 64,
                      variants=[NewVariant("base", None, None), NewVariant(ADAPTER, "/ad", "a" * 64)],
                      examples=examples, chunk_size=len(examples)).id


def store_choice_run(sessions: sessionmaker[Session]) -> int:
    """The choice run above, with each (example, variant)'s output the acc pick, as a worker writes it."""
    with sessions.begin() as session:
        examples = [NewExample(i, {"n": i, "options": list(ex.choices), "label": ex.gold}, f"Q{i}:",
                               ex.choices[ex.gold], list(ex.choices), ex.gold) for i, ex in enumerate(CHOICE_EXAMPLES)]
        run_id = _run(session, CHOICE_CONFIG, examples, "mc.jsonl")
        generations, scores = [], []
        for i, ex in enumerate(CHOICE_EXAMPLES):
            for variant, logprobs in (("base", ex.base), (ADAPTER, ex.ad)):
                pick = first_argmax(logprobs)
                generations.append(_generation(run_id, i, variant, ex.choices[pick], ex.choices[pick], pick == ex.gold))
                scores += [NewScore(run_id, i, variant, c, lp, tokens=1 + len(choice), bytes=len(choice.encode()),
                                    chars=len(choice), greedy=c == pick)
                           for c, (choice, lp) in enumerate(zip(ex.choices, logprobs))]
        insert_generations(session, generations)
        insert_scores(session, scores)
    return run_id


def store_perplexity_run(sessions: sessionmaker[Session]) -> int:
    """The perplexity run above: one document score per (example, variant)."""
    with sessions.begin() as session:
        examples = [NewExample(i, {"text": text}, text, None) for i, (text, _, _) in enumerate(DOCUMENTS)]
        run_id = _run(session, PERPLEXITY_CONFIG, examples, "docs.jsonl")
        generations, scores = [], []
        for i, (text, base, ad) in enumerate(DOCUMENTS):
            for variant, logprob in (("base", base), (ADAPTER, ad)):
                generations.append(_generation(run_id, i, variant, "", None, None))
                scores.append(NewScore(run_id, i, variant, 0, logprob, tokens=len(text.split()) + 1,
                                       bytes=len(text.encode("utf-8")), chars=len(text),
                                       words=len(re.split(r"\s+", text)), greedy=False))
        insert_generations(session, generations)
        insert_scores(session, scores)
    return run_id
