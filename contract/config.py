"""The run configuration (YAML): parsed and validated once, into frozen dataclasses.

Every key of DESIGN.md is accepted and checked; an unknown key, a wrong type or an impossible value
is a `ConfigError` whose message names the file and the key. Relative paths are looked up next to
the config file first, then in the current folder, and stored absolute.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .scoring import RULES
from .settings import DEMO_BASE

#: Names an adapter may not take: `base` is the base model's variant name, `__base__` is PEFT's.
RESERVED_VARIANTS = ("base", "__base__")
#: What an adapter name may contain (it is a column value and a PEFT adapter name).
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: The version of the stored config's shape (`RunConfig.to_dict`). Bump it when a key is added or its
#: meaning changes: a worker that meets a newer version fails the chunk and says to upgrade.
CONFIG_VERSION = 1
#: The stored config's key for that version (not a YAML key: users never write it).
VERSION_KEY = "config_version"
DTYPES = ("auto", "float32", "bfloat16", "float16")
MATCHES = tuple(RULES)


@dataclass(frozen=True)
class ModelConfig:
    base: str
    adapters: tuple[tuple[str, str], ...]  # (name, folder), in the config's order
    dtype: str = "auto"
    trust_remote_code: bool = False

    @property
    def is_demo(self) -> bool:
        return self.base == DEMO_BASE


@dataclass(frozen=True)
class DatasetConfig:
    path: str
    prompt: str
    reference: str | None = None
    system_prompt: str | None = None
    chat_template: bool = True
    limit: int | None = None


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class InferenceConfig:
    batch_size: int = 8
    chunk_size: int = 200
    use_peft_directly: bool = True


@dataclass(frozen=True)
class ScoringConfig:
    extract: str | None = None
    match: str = "exact"
    normalize: bool = False  # SQuAD-style: case, punctuation, articles, white space (exact, contains)
    tolerance: float = 0.0  # numeric: absolute difference still counted as equal


@dataclass(frozen=True)
class RunConfig:
    name: str
    model: ModelConfig
    dataset: DatasetConfig
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; `from_dict(to_dict())` gives the same config back."""
        data = asdict(self)
        data["model"]["adapters"] = {name: path for name, path in self.model.adapters}
        data["generation"]["stop"] = list(self.generation.stop)
        data[VERSION_KEY] = CONFIG_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<stored config>") -> RunConfig:
        """The config `to_dict` stored. One without a version is version 1 (stored before versions)."""
        data = dict(data)
        version = data.pop(VERSION_KEY, 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ConfigError(f"{source}: '{VERSION_KEY}' must be a positive integer, got {_kind(version)}")
        if version > CONFIG_VERSION:
            raise ConfigError(f"{source}: config version {version} was written by a newer lora-compare (this one "
                              f"reads up to version {CONFIG_VERSION}); upgrade lora-compare here")
        return _parse(data, source=source, base_dir=None)


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run config."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config: {err}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    if data is None:
        raise ConfigError(f"{path}: the config is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys, not a {type(data).__name__}")
    data = dict(data)
    data.setdefault("name", path.stem)
    return _parse(data, source=str(path), base_dir=path.resolve().parent)


# --- parsing -----------------------------------------------------------------------------------

_SECTIONS: dict[str, tuple[str, ...]] = {
    "model": ("base", "adapters", "dtype", "trust_remote_code"),
    "dataset": ("path", "prompt", "reference", "system_prompt", "chat_template", "limit"),
    "generation": ("max_new_tokens", "do_sample", "temperature", "top_p", "seed", "stop"),
    "inference": ("batch_size", "chunk_size", "use_peft_directly"),
    "scoring": ("extract", "match", "normalize", "tolerance"),
}
_TOP = ("name", *_SECTIONS)


class _Reader:
    """Reads typed values out of one section, naming `file: key 'section.key'` in every error."""

    def __init__(self, source: str, section: str, data: Any) -> None:
        self.source, self.section = source, section
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise self.error(None, f"must be a mapping, got {_kind(data)}")
        _reject_unknown(source, section, data, _SECTIONS[section])
        self.data = data

    def error(self, key: str | None, message: str) -> ConfigError:
        name = f"{self.section}.{key}" if key else self.section
        return ConfigError(f"{self.source}: key '{name}' {message}")

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        if not self.has(key):
            if required:
                raise self.error(key, "is required")
            return default
        value = self.data[key]
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {_kind(value)}")
        if required and not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        if not self.has(key):
            return default
        value = self.data[key]
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {_kind(value)}")
        return value

    def integer(self, key: str, default: int | None, *, minimum: int) -> int | None:
        if not self.has(key):
            return default
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, got {_kind(value)}")
        if value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}")
        return value

    def number(self, key: str, default: float, *, low: float, high: float, low_open: bool = False) -> float:
        if not self.has(key):
            return default
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"must be a number, got {_kind(value)}")
        if value < low or value > high or (low_open and value == low):
            bracket = "(" if low_open else "["
            raise self.error(key, f"must be in {bracket}{low}, {high}], got {value}")
        return float(value)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.string(key, default)
        assert value is not None
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}; got '{value}'")
        return value


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float, str)):
        return f"{type(value).__name__} {value!r}"
    return {"dict": "a mapping", "list": "a list"}.get(type(value).__name__, type(value).__name__)


def _reject_unknown(source: str, section: str | None, data: dict[Any, Any], known: tuple[str, ...]) -> None:
    for key in data:
        if key in known:
            continue
        name = f"{section}.{key}" if section else str(key)
        hint = difflib.get_close_matches(str(key), known, n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else f" (known: {', '.join(known)})"
        raise ConfigError(f"{source}: unknown key '{name}'{suggestion}")


def _resolve(source: str, key: str, value: str, base_dir: Path | None) -> str:
    """Absolute path for `value`: next to the config first, then the current folder."""
    path = Path(value).expanduser()
    if path.is_absolute() or base_dir is None:
        return str(path)
    beside_config = base_dir / path
    if beside_config.exists() or not path.exists():
        return str(beside_config)
    return str(path.resolve())


def _parse(data: dict[str, Any], *, source: str, base_dir: Path | None) -> RunConfig:
    _reject_unknown(source, None, data, _TOP)
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{source}: key 'name' must be a non-empty string, got {_kind(name)}")

    if "model" not in data:
        raise ConfigError(f"{source}: key 'model' is required")
    if "dataset" not in data:
        raise ConfigError(f"{source}: key 'dataset' is required")
    m = _Reader(source, "model", data.get("model"))
    base = m.string("base", required=True)
    assert base is not None
    if base != DEMO_BASE:
        base = _resolve(source, "model.base", base, base_dir)
    adapters = _adapters(m, base_dir)
    model = ModelConfig(
        base=base,
        adapters=adapters,
        dtype=m.choice("dtype", "auto", DTYPES),
        trust_remote_code=m.boolean("trust_remote_code", False),
    )

    d = _Reader(source, "dataset", data.get("dataset"))
    dataset_path = d.string("path", required=True)
    assert dataset_path is not None
    dataset = DatasetConfig(
        path=_resolve(source, "dataset.path", dataset_path, base_dir),
        prompt=d.string("prompt", required=True) or "",
        reference=d.string("reference"),
        system_prompt=d.string("system_prompt"),
        chat_template=d.boolean("chat_template", True),
        limit=d.integer("limit", None, minimum=1),
    )

    g = _Reader(source, "generation", data.get("generation"))
    stop = g.data.get("stop")
    if stop is None:
        stop = []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise g.error("stop", f"must be a list of non-empty strings, got {_kind(stop)}")
    generation = GenerationConfig(
        max_new_tokens=g.integer("max_new_tokens", 64, minimum=1) or 64,
        do_sample=g.boolean("do_sample", False),
        temperature=g.number("temperature", 1.0, low=0.0, high=100.0, low_open=True),
        top_p=g.number("top_p", 1.0, low=0.0, high=1.0, low_open=True),
        seed=g.integer("seed", 0, minimum=0) or 0,
        stop=tuple(stop),
    )

    i = _Reader(source, "inference", data.get("inference"))
    inference = InferenceConfig(
        batch_size=i.integer("batch_size", 8, minimum=1) or 8,
        chunk_size=i.integer("chunk_size", 200, minimum=1) or 200,
        use_peft_directly=i.boolean("use_peft_directly", True),
    )

    s = _Reader(source, "scoring", data.get("scoring"))
    extract = s.string("extract")
    if extract is not None:
        try:
            re.compile(extract)
        except re.error as err:
            raise s.error("extract", f"is not a valid regular expression: {err}") from None
    scoring = ScoringConfig(
        extract=extract,
        match=s.choice("match", "exact", MATCHES),
        normalize=s.boolean("normalize", False),
        tolerance=s.number("tolerance", 0.0, low=0.0, high=float("inf")),
    )

    return RunConfig(
        name=name.strip(), model=model, dataset=dataset, generation=generation, inference=inference, scoring=scoring
    )


def _adapters(m: _Reader, base_dir: Path | None) -> tuple[tuple[str, str], ...]:
    raw = m.data.get("adapters")
    if not raw:
        raise m.error("adapters", "must name at least one adapter (name: folder)")
    if not isinstance(raw, dict):
        raise m.error("adapters", f"must be a mapping of name to folder, got {_kind(raw)}")
    adapters = []
    for name, folder in raw.items():
        if not isinstance(name, str):
            raise m.error("adapters", f"has a name that is not a string: {name!r}")
        if name in RESERVED_VARIANTS:
            raise m.error(f"adapters.{name}", f"uses a reserved name ('{name}' is the base model); rename it")
        if not ADAPTER_NAME_RE.match(name):
            raise m.error(
                f"adapters.{name}", "must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
            )
        if not isinstance(folder, str) or not folder.strip():
            raise m.error(f"adapters.{name}", f"must be a folder path, got {_kind(folder)}")
        adapters.append((name, _resolve(m.source, f"model.adapters.{name}", folder, base_dir)))
    return tuple(adapters)
