"""Property-based tests: whatever the input, the result is a value or the project's own error."""

from __future__ import annotations

import json
import string
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract.config import RunConfig, load_config
from contract.errors import UserError
from contract.scoring import choice_letter, last_number, score
from producer.dataset import Row, read_rows
from producer.templates import RowTemplate, render_row

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=10), children, max_size=4), max_leaves=12)
KEYS = ["name", "model", "dataset", "generation", "inference", "scoring", "base", "adapters", "path", "prompt",
        "batch_size", "chunk_size", "stop", "extract", "match", "limit", "dtype", "x"]
config_like = st.recursive(json_scalars, lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.sampled_from(KEYS), children, max_size=5), max_leaves=15)


@FUZZ
@given(text=st.text(max_size=300))
def test_config_from_any_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except UserError:
        pass


@FUZZ
@given(data=config_like)
def test_config_from_any_structure(tmp_path: Path, data: object) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(data), encoding="utf-8")  # JSON is YAML
    try:
        config = load_config(path)
    except UserError:
        return
    assert RunConfig.from_dict(config.to_dict()) == config


@FUZZ
@given(raw=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".csv"]), limit=st.none()
       | st.integers(1, 5))
def test_dataset_from_any_bytes(tmp_path: Path, raw: bytes, suffix: str, limit: int | None) -> None:
    path = tmp_path / f"d{suffix}"
    path.write_bytes(raw)
    try:
        rows = read_rows(path, limit=limit)
    except UserError:
        return
    assert rows and all(isinstance(r.data, dict) for r in rows)


@FUZZ
@given(lines=st.lists(json_values, min_size=1, max_size=5))
def test_dataset_from_any_json_lines(tmp_path: Path, lines: list[object]) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(v) for v in lines), encoding="utf-8")
    try:
        read_rows(path)
    except UserError:
        pass


template_text = st.text(alphabet=string.printable, max_size=60) | st.sampled_from(
    ["{{ a }}", "{{ a.b }}", "{{ a | upper }}", "{% for x in a %}{{ x }}{% endfor %}", "{{ a + b }}",
     "{{ a[0] }}", "{{ range(10**9) | list }}", "{{ a.__class__ }}", "{% if a %}", "{{ missing }}"])


@FUZZ
@given(source=template_text, data=st.dictionaries(st.sampled_from(["a", "b", "c"]), json_values, max_size=3))
def test_templates_on_any_row(source: str, data: dict[str, object]) -> None:
    try:
        template = RowTemplate("dataset.prompt", source)
        render_row(template, None, Row(0, "d.jsonl:1", data))
    except UserError:
        pass


@FUZZ
@given(output=st.text(max_size=200), reference=st.none() | st.text(max_size=30),
       pattern=st.none() | st.sampled_from([r"(\d+)", r"answer: (.*)", r"\w+", r"(a)|(b)", r"()", r"x*"]),
       match=st.sampled_from(["exact", "contains", "numeric", "choice"]), normalize=st.booleans(),
       tolerance=st.floats(0, 10))
def test_scoring_never_raises(output: str, reference: str | None, pattern: str | None, match: str,
                              normalize: bool, tolerance: float) -> None:
    from contract.config import ScoringConfig

    result = score(output, reference, ScoringConfig(extract=pattern, match=match, normalize=normalize,
                                                    tolerance=tolerance))
    assert result.correct in (None, True, False)
    if reference is None:
        assert result.correct is None
    last_number(output)
    choice_letter(output)
