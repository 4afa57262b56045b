"""Every SQL example of the README and the docs runs on SQLite and on PostgreSQL (issue 14: the
README's `avg(correct)` failed on PostgreSQL). The examples run as `lora-compare sql` runs them
(db.readonly), against a run with scored outputs; run 1 is the first run of a fresh database. The
examples of the log-likelihood tasks' tables and views also run against a stored run of their task
(tests/loglik_runs.py), where each must return rows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from db.engine import make_engine, session_factory
from db.migrate import upgrade
from db.readonly import run_readonly
from db.runs import NewExample, NewVariant, create_run
from tests.fake_generator import FakeGenerator, fake_adapter_hash
from tests.loglik_runs import store_choice_run, store_perplexity_run
from worker.chunk import Processed, process_chunk

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "docs/sql.md", "docs/deploying.md"]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_QUOTED = re.compile(r'"((?:SELECT|WITH)\b[^"]*)"', re.S)


def examples() -> list[tuple[str, str]]:
    """(where, query): every ```sql block that is a statement, and every double-quoted SELECT in a
    shell block (`lora-compare sql "..."`, `psql -c "..."`, `sqlite3 FILE "..."`)."""
    found = []
    for name in DOCS:
        for lang, body in _FENCE.findall((ROOT / name).read_text(encoding="utf-8")):
            if lang == "sql":
                statement = body.strip().rstrip(";")
                if re.match(r"(SELECT|WITH)\b", statement):
                    found.append((name, statement))
            elif lang in ("bash", "sh", ""):
                found += [(name, " ".join(q.split())) for q in _QUOTED.findall(body.replace("\\\n", " "))]
    return found


def test_the_docs_have_sql_examples() -> None:
    where = {name for name, _ in examples()}
    assert where == set(DOCS) and len(examples()) >= 12


def _scored_run(url: str) -> None:
    """Run 1: 3 examples x (base, adapter `a`), every row scored (false: the fake's outputs are not the
    references), so `correct` holds booleans on PostgreSQL and 0/1 on SQLite."""
    engine = make_engine(url)
    upgrade(engine)
    sessions = session_factory(engine)
    config = {"name": "docs", "model": {"base": "demo", "adapters": {"a": "/a"}},
              "dataset": {"path": "d.jsonl", "prompt": "{{ q }}", "reference": "{{ q }}"},
              "generation": {"max_new_tokens": 4}}
    with sessions.begin() as session:
        run_id = create_run(session, name="docs", config=config, config_path=None, base_model="demo",
                            dataset_path="d.jsonl", dataset_sha256="0" * 64,
                            variants=[NewVariant("base", None, None), NewVariant("a", "/a", fake_adapter_hash("a"))],
                            examples=[NewExample(i, {"q": i}, f"p{i}", str(i)) for i in range(3)], chunk_size=3).id
    assert run_id == 1
    assert process_chunk(sessions, FakeGenerator(), run_id, 0, worker="w", max_attempts=3) is Processed.DONE
    engine.dispose()


#: Where an example reads a log-likelihood task's rows: the task whose run it is checked on.
_LOGLIK = {"document_scores": "perplexity", "choice_scores": "choice", "answer_index": "choice",
           "loglikelihoods": "choice"}


def _loglik_task(query: str) -> str | None:
    return next((task for name, task in _LOGLIK.items() if name in query), None)


def test_the_loglik_examples_return_rows_on_a_run_of_their_task(any_db_url: str) -> None:
    _scored_run(any_db_url)
    engine = make_engine(any_db_url)
    sessions = session_factory(engine)
    runs = {"choice": store_choice_run(sessions), "perplexity": store_perplexity_run(sessions)}
    engine.dispose()
    checked = {task: 0 for task in runs}
    for where, query in examples():
        task = _loglik_task(query)
        if task is None or "run_id = 1" not in query:
            continue
        result = run_readonly(any_db_url, query.replace("run_id = 1", f"run_id = {runs[task]}"))
        assert result.rows, f"{where}: {query[:80]}... returned nothing on a {task} run"
        checked[task] += 1
    assert checked["choice"] >= 4 and checked["perplexity"] >= 2, checked


def test_every_sql_example_runs_on_both_backends(any_db_url: str) -> None:
    _scored_run(any_db_url)
    failures = []
    for where, query in examples():
        try:
            result = run_readonly(any_db_url, query)
        except Exception as err:  # noqa: BLE001 - collect them all, then say which
            failures.append(f"{where}: {query[:80]}...: {' '.join(str(err).split())[:160]}")
            continue
        if "run_id = 1" in query and "count(*)" in query.replace("COUNT", "count") and _loglik_task(query) is None:
            assert result.rows, f"{where}: {query} returned nothing"
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("query", ["SELECT variant, avg(correct) FROM outputs GROUP BY variant"])
def test_the_check_catches_what_postgresql_refuses(pg_url: str, query: str) -> None:
    _scored_run(pg_url)
    with pytest.raises(Exception, match="avg"):
        run_readonly(pg_url, query)
