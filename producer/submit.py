"""Turning a config file into a registered run: validate everything, then record it in SQL.

Nothing is written or queued until the whole config, every dataset row and every adapter has been
checked, so a bad input leaves no half-made run behind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from contract.artifacts import AdapterInfo, base_model_shapes, check_adapter_fits, inspect_adapter
from contract.config import RunConfig, load_config
from contract.errors import ConfigError
from contract.settings import Settings
from db.enums import BASE_VARIANT
from db.runs import NewExample, NewVariant, create_run

from .dataset import file_sha256, read_rows
from .tasks import TaskTemplates

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedRun:
    """A fully validated run, ready to be recorded."""

    config: RunConfig
    config_path: str
    examples: list[NewExample]
    adapters: list[AdapterInfo]
    dataset_sha256: str


def base_model_folder(config: RunConfig, settings: Settings) -> Path:
    return settings.demo_model_dir if config.model.is_demo else Path(config.model.base)


def prepare_run(config_path: str | Path, settings: Settings, *, require_base: bool = True) -> PreparedRun:
    """Validate the config, the dataset (every row rendered) and every adapter against the base model.

    `require_base=False` allows a base model this host does not hold (the workers check it on load).
    """
    config = load_config(config_path)
    source = str(config_path)
    templates = TaskTemplates.compile(config, source)
    examples = [templates.example(row) for row in read_rows(config.dataset.path, limit=config.dataset.limit)]

    _check_model_roots(config, settings, source)
    adapters = [inspect_adapter(name, folder) for name, folder in config.model.adapters]
    base_folder = base_model_folder(config, settings)
    label = "the demo model" if config.model.is_demo else str(base_folder)
    if base_folder.is_dir() or (require_base and not config.model.is_demo):
        try:
            shapes = base_model_shapes(base_folder)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        for info in adapters:
            check_adapter_fits(info, shapes, label)
    else:
        log.warning("base model %s is not on this host; the workers will check the adapters when they load it", label)

    return PreparedRun(
        config=config,
        config_path=str(Path(config_path).resolve()),
        examples=examples,
        adapters=adapters,
        dataset_sha256=file_sha256(Path(config.dataset.path)),
    )


def _check_model_roots(config: RunConfig, settings: Settings, source: str) -> None:
    """With LORA_COMPARE_MODEL_ROOTS set where runs are submitted (the Docker cli service: /data), refuse
    a model or adapter folder the workers would refuse, before anything is queued."""
    roots = settings.model_roots
    paths = [] if config.model.is_demo else [("model.base", config.model.base)]
    paths += [(f"model.adapters.{name}", folder) for name, folder in config.model.adapters]
    for key, path in paths if roots else []:
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(root.resolve()) for root in roots):
            allowed = ", ".join(str(root) for root in roots)
            raise ConfigError(f"{source}: {key}: {path} is outside the folders the workers load from ({allowed}); "
                              "put it there (LORA_COMPARE_MODEL_ROOTS)")


def register_run(session: Session, prepared: PreparedRun, *, queue: str | None = None) -> int:
    """Record the run, its variants, examples and chunks (all queued); returns the run id.

    `queue`: the broker queue its chunks go to (None: the default queue, or embedded mode)."""
    config = prepared.config
    variants = [NewVariant(BASE_VARIANT, None, None)] + [
        NewVariant(info.name, str(info.path), info.sha256) for info in prepared.adapters
    ]
    run = create_run(
        session,
        name=config.name,
        config=config.to_dict(),
        config_path=prepared.config_path,
        base_model=config.model.base,
        dataset_path=config.dataset.path,
        dataset_sha256=prepared.dataset_sha256,
        variants=variants,
        examples=prepared.examples,
        chunk_size=config.inference.chunk_size,
        queue=queue,
    )
    return run.id
