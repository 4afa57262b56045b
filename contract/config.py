"""The run configuration (YAML): parsed and validated once, into frozen dataclasses.

Every key of DESIGN.md is accepted and checked; an unknown key, a wrong type or an impossible value
is a `ConfigError` whose message names the file and the key. Relative paths are looked up next to
the config file first, then in the current folder, and stored absolute.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config_keys import Reader, kind, reject_unknown
from .errors import ConfigError
from .scoring import RULES
from .settings import DEMO_BASE

#: Names an adapter may not take: `base` is the base model's variant name, `__base__` is PEFT's.
RESERVED_VARIANTS = ("base", "__base__")
#: What an adapter name may contain (it is a column value and a PEFT adapter name).
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: The version of the stored config's shape (`RunConfig.to_dict`). Bump it when a key is added or its
#: meaning changes: a worker that meets a newer version fails the chunk and says to upgrade.
CONFIG_VERSION = 2  # 2: `task` and the log-likelihood dataset keys
#: The stored config's key for that version (not a YAML key: users never write it).
VERSION_KEY = "config_version"
DTYPES = ("auto", "float32", "bfloat16", "float16")
MATCHES = tuple(RULES)
#: What a run does with each row: generate an answer (the default), score answer choices by their
#: log-likelihood, or measure a text's perplexity (DESIGN.md, "Log-likelihood tasks").
TASKS = ("generate", "choice", "perplexity")
#: The tasks scored by log-likelihood instead of generated.
LOGLIK_TASKS = ("choice", "perplexity")


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
    prompt: str  # generate: the prompt; choice: the context; perplexity: unused ("")
    reference: str | None = None
    system_prompt: str | None = None
    chat_template: bool = True  # default false for choice and perplexity (as in lm-evaluation-harness)
    limit: int | None = None
    #: choice: one template rendering a list (a field holding one), or one template per choice
    choices: str | tuple[str, ...] | None = None
    answer: str | None = None  # choice: the gold answer (0-based index, letter, or the choice's text)
    #: choice: put between the context and each choice; None: the harness's, one space, or nothing when the
    #: context is wrapped in the chat template (its generation prompt ends the context)
    target_delimiter: str | None = None
    text: str | None = None  # perplexity: the document


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
    task: str = "generate"  # one of TASKS

    @property
    def choice_delimiter(self) -> str:
        """What goes between a choice run's context and each choice (`dataset.target_delimiter`)."""
        d = self.dataset
        if d.target_delimiter is not None:
            return d.target_delimiter
        return "" if d.chat_template else " "

    @property
    def loglik(self) -> bool:
        """Scored by log-likelihood (choice, perplexity) rather than generated."""
        return self.task in LOGLIK_TASKS

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; `from_dict(to_dict())` gives the same config back."""
        data = asdict(self)
        data["model"]["adapters"] = {name: path for name, path in self.model.adapters}
        data["generation"]["stop"] = list(self.generation.stop)
        if isinstance(self.dataset.choices, tuple):
            data["dataset"]["choices"] = list(self.dataset.choices)
        for key in _TASK_SPECIFIC:  # only the dataset keys of this task (an older reader knows no others)
            if key not in _TASK_KEYS[self.task]:
                del data["dataset"][key]
        if self.task != "generate":
            data["task"] = self.task
            del data["generation"], data["scoring"]
        data[VERSION_KEY] = CONFIG_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<stored config>") -> RunConfig:
        """The config `to_dict` stored. One without a version is version 1 (stored before versions)."""
        data = dict(data)
        version = data.pop(VERSION_KEY, 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ConfigError(f"{source}: '{VERSION_KEY}' must be a positive integer, got {kind(version)}")
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
    "dataset": ("path", "prompt", "reference", "system_prompt", "chat_template", "limit", "choices", "answer",
                "target_delimiter", "text"),
    "generation": ("max_new_tokens", "do_sample", "temperature", "top_p", "seed", "stop"),
    "inference": ("batch_size", "chunk_size", "use_peft_directly"),
    "scoring": ("extract", "match", "normalize", "tolerance"),
}
_TOP = ("name", "task", *_SECTIONS)


def _reader(source: str, section: str, data: dict[str, Any]) -> Reader:
    return Reader(source, section, data.get(section), _SECTIONS[section])


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
    reject_unknown(source, None, data, _TOP)
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{source}: key 'name' must be a non-empty string, got {kind(name)}")

    if "model" not in data:
        raise ConfigError(f"{source}: key 'model' is required")
    if "dataset" not in data:
        raise ConfigError(f"{source}: key 'dataset' is required")
    m = _reader(source, "model", data)
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

    task = data.get("task", "generate")
    if task not in TASKS:
        raise ConfigError(f"{source}: key 'task' must be one of {', '.join(TASKS)}; got {kind(task)}")
    dataset = _dataset(_reader(source, "dataset", data), task, base_dir)
    if task in LOGLIK_TASKS:
        for section in ("generation", "scoring"):
            if data.get(section) is not None:
                raise ConfigError(f"{source}: key '{section}' does not apply to task: {task} (it scores by "
                                  "log-likelihood and generates nothing); remove it")

    g = _reader(source, "generation", data)
    stop = g.data.get("stop")
    if stop is None:
        stop = []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise g.error("stop", f"must be a list of non-empty strings, got {kind(stop)}")
    generation = GenerationConfig(
        max_new_tokens=g.integer("max_new_tokens", 64, minimum=1) or 64,
        do_sample=g.boolean("do_sample", False),
        temperature=g.number("temperature", 1.0, low=0.0, high=100.0, low_open=True),
        top_p=g.number("top_p", 1.0, low=0.0, high=1.0, low_open=True),
        seed=g.integer("seed", 0, minimum=0) or 0,
        stop=tuple(stop),
    )

    i = _reader(source, "inference", data)
    inference = InferenceConfig(
        batch_size=i.integer("batch_size", 8, minimum=1) or 8,
        chunk_size=i.integer("chunk_size", 200, minimum=1) or 200,
        use_peft_directly=i.boolean("use_peft_directly", True),
    )

    s = _reader(source, "scoring", data)
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

    return RunConfig(name=name.strip(), model=model, dataset=dataset, generation=generation, inference=inference,
                     scoring=scoring, task=task)


#: The dataset keys each task reads besides path, system_prompt, chat_template and limit (any other is refused).
_TASK_KEYS = {"generate": ("prompt", "reference"), "choice": ("prompt", "choices", "answer", "target_delimiter"),
              "perplexity": ("text",)}
_TASK_SPECIFIC = ("prompt", "reference", "choices", "answer", "target_delimiter", "text")


def _dataset(d: Reader, task: str, base_dir: Path | None) -> DatasetConfig:
    for key in _TASK_SPECIFIC:
        if d.has(key) and key not in _TASK_KEYS[task]:
            raise d.error(key, f"does not apply to task: {task} (its keys: {', '.join(_TASK_KEYS[task])})")
    if task == "perplexity":
        if d.boolean("chat_template", False):
            raise d.error("chat_template", "does not apply to task: perplexity (a document is scored as it is)")
        if d.has("system_prompt"):
            raise d.error("system_prompt", "does not apply to task: perplexity (a document is scored as it is)")
    path = d.string("path", required=True)
    assert path is not None
    choices: str | tuple[str, ...] | None = None
    if task == "choice":
        raw = d.data.get("choices")
        if raw is None:
            raise d.error("choices", "is required for task: choice (a field holding a list, e.g. \"{{ options }}\", "
                                     "or a list of templates, one per choice)")
        if isinstance(raw, list):
            if not raw or not all(isinstance(c, str) and c for c in raw):
                raise d.error("choices", "must be a non-empty list of templates (non-empty strings)")
            choices = tuple(raw)
        else:
            choices = d.string("choices", required=True)
        d.string("answer", required=True)
    delimiter = d.data.get("target_delimiter")
    if delimiter is not None and not isinstance(delimiter, str):
        raise d.error("target_delimiter", f"must be a string, got {kind(delimiter)}")
    return DatasetConfig(
        path=_resolve(d.source, "dataset.path", path, base_dir),
        prompt=d.string("prompt", required=task != "perplexity") or "",
        reference=d.string("reference"),
        system_prompt=d.string("system_prompt"),
        chat_template=d.boolean("chat_template", task == "generate"),
        limit=d.integer("limit", None, minimum=1),
        choices=choices,
        answer=d.string("answer"),
        target_delimiter=delimiter,
        text=d.string("text", required=task == "perplexity"),
    )


def _adapters(m: Reader, base_dir: Path | None) -> tuple[tuple[str, str], ...]:
    raw = m.data.get("adapters")
    if not raw:
        raise m.error("adapters", "must name at least one adapter (name: folder)")
    if not isinstance(raw, dict):
        raise m.error("adapters", f"must be a mapping of name to folder, got {kind(raw)}")
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
            raise m.error(f"adapters.{name}", f"must be a folder path, got {kind(folder)}")
        adapters.append((name, _resolve(m.source, f"model.adapters.{name}", folder, base_dir)))
    return tuple(adapters)
