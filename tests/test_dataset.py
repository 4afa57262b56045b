from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract.errors import ConfigError, DatasetError
from producer.dataset import Row, read_rows
from producer.templates import RowTemplate, render_row


def test_jsonl_json_and_csv_give_the_same_rows(tmp_path: Path) -> None:
    rows = [{"q": "a,b", "answer": "1"}, {"q": "c \"d\"", "answer": "2"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text('q,answer\n"a,b",1\n"c ""d""",2\n')
    for name in ("d.jsonl", "d.json", "d.csv"):
        got = read_rows(tmp_path / name)
        assert [r.data for r in got] == rows, name
        assert [r.idx for r in got] == [0, 1]
    assert read_rows(tmp_path / "d.jsonl", limit=1)[0].data == rows[0]
    assert len(read_rows(tmp_path / "d.csv", limit=1)) == 1


def test_malformed_jsonl_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n{"a": 2\n')
    with pytest.raises(DatasetError, match=rf"^{path}:2: not valid JSON"):
        read_rows(path)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DatasetError, match=rf"^{path}:2: each line must be a JSON object"):
        read_rows(path)


def test_csv_row_with_wrong_field_count_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b\n1,2\n3\n")
    with pytest.raises(DatasetError, match=rf"^{path}:3: expected 2 fields"):
        read_rows(path)


@pytest.mark.parametrize(("name", "text"), [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "a,b\n")])
def test_empty_dataset_is_an_error(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(DatasetError, match="the dataset has no rows"):
        read_rows(tmp_path / name)


def test_unsupported_and_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unsupported dataset format '.txt'"):
        read_rows(tmp_path / "d.txt")
    with pytest.raises(DatasetError, match="no such dataset file"):
        read_rows(tmp_path / "d.jsonl")


def test_template_missing_field_names_field_and_row() -> None:
    row = Row(3, "data.jsonl:4", {"a": 1, "answer": 2})
    with pytest.raises(DatasetError) as err:
        render_row(RowTemplate("dataset.prompt", "What is {{ a }} plus {{ b }}?"), None, row)
    assert str(err.value) == (
        "data.jsonl:4: the dataset.prompt template uses 'b', which this row does not have (its fields: a, answer)"
    )


def test_template_renders_and_is_sandboxed() -> None:
    row = Row(0, "d:1", {"a": 1, "b": 2, "answer": 3})
    assert render_row(RowTemplate("dataset.prompt", "{{a}}+{{b}}"), RowTemplate("dataset.reference", "{{answer}}"),
                      row) == ("1+2", "3")
    with pytest.raises(DatasetError, match="cannot render"):
        RowTemplate("dataset.prompt", "{{ a.__class__.__mro__[1].__subclasses__() }}").render(row)


def test_template_syntax_error_names_the_key() -> None:
    with pytest.raises(ConfigError, match="key 'dataset.prompt': template syntax error"):
        RowTemplate("dataset.prompt", "{{ a ")
