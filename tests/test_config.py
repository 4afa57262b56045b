from __future__ import annotations

from pathlib import Path

import pytest

from contract.config import RunConfig, load_config
from contract.errors import ConfigError

FULL = """
name: arith-v1
model:
  base: demo
  adapters:
    arith: adapters/arith
  dtype: auto
  trust_remote_code: false
dataset:
  path: data.jsonl
  prompt: "What is {{ a }} plus {{ b }}?"
  reference: "{{ answer }}"
  system_prompt: null
  chat_template: true
  limit: null
generation:
  max_new_tokens: 64
  do_sample: false
  temperature: 1.0
  top_p: 1.0
  seed: 0
  stop: []
inference:
  batch_size: 8
  chunk_size: 200
  use_peft_directly: true
scoring:
  extract: null
  match: exact
"""


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_documented_key_is_accepted_and_round_trips(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, FULL))
    assert config.name == "arith-v1"
    assert config.model.adapters == (("arith", str(tmp_path / "adapters/arith")),)
    assert config.dataset.path == str(tmp_path / "data.jsonl")
    assert config.inference.batch_size == 8 and config.inference.use_peft_directly is True
    assert RunConfig.from_dict(config.to_dict()) == config


def test_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    text = "\n".join(line for line in FULL.splitlines() if not line.startswith("name:"))
    assert load_config(_write(tmp_path, text, "my-eval.yaml")).name == "my-eval"


def test_relative_paths_fall_back_to_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "data.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(_write(tmp_path / "cfgs", FULL))
    assert config.dataset.path == str(tmp_path / "data.jsonl")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("  batch_size: 8", "  batch_size: 8\n  batchsize: 4", "unknown key 'inference.batchsize'"),
        ("generation:", "generaton:\n  x: 1\ngeneration:", "unknown key 'generaton'; did you mean 'generation'?"),
        ("  batch_size: 8", "  batch_size: -1", "key 'inference.batch_size' must be at least 1, got -1"),
        ("  chunk_size: 200", "  chunk_size: 0", "key 'inference.chunk_size' must be at least 1, got 0"),
        ("  max_new_tokens: 64", "  max_new_tokens: many", "key 'generation.max_new_tokens' must be an integer"),
        ("  do_sample: false", "  do_sample: 1", "key 'generation.do_sample' must be true or false"),
        ("  top_p: 1.0", "  top_p: 1.5", "key 'generation.top_p' must be in (0.0, 1.0], got 1.5"),
        ("  dtype: auto", "  dtype: int8", "key 'model.dtype' must be one of auto, float32, bfloat16, float16"),
        ("  match: exact", "  match: fuzzy", "key 'scoring.match' must be one of exact, contains, numeric"),
        ("  extract: null", "  extract: '(unclosed'", "key 'scoring.extract' is not a valid regular expression"),
        ("    arith: adapters/arith", "    base: adapters/arith", "key 'model.adapters.base' uses a reserved name"),
        ("    arith: adapters/arith", "    'bad name': x", "key 'model.adapters.bad name' must be 1-64 letters"),
        ("  adapters:\n    arith: adapters/arith", "  adapters: {}", "key 'model.adapters' must name at least one"),
        ("  path: data.jsonl", "  path: 3", "key 'dataset.path' must be a string, got int 3"),
        ("  stop: []", "  stop: [1]", "key 'generation.stop' must be a list of non-empty strings"),
        ("  prompt: \"What is {{ a }} plus {{ b }}?\"", "", "key 'dataset.prompt' is required"),
    ],
)
def test_bad_values_name_the_file_and_key(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in FULL
    path = _write(tmp_path, FULL.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_syntax_error_gives_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "model:\n  base: demo\n  adapters: [unclosed\ndataset: {}\n")
    with pytest.raises(ConfigError, match=rf"^{path}:\d+: YAML syntax error"):
        load_config(path)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="the config is empty"):
        load_config(_write(tmp_path, ""))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))
