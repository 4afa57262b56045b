"""Recording a new run: its variants, examples and chunks, all `queued` (the caller commits)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from .enums import RunStatus
from .schema import Chunk, Example, Run, Variant


@dataclass(frozen=True)
class NewExample:
    """A validated dataset row, ready to store."""

    idx: int
    data: dict[str, Any]
    prompt: str
    reference: str | None
    choices: list[str] | None = None  # task choice: the rendered choices
    answer_index: int | None = None  # task choice: the gold choice's index


@dataclass(frozen=True)
class NewVariant:
    name: str
    adapter_path: str | None
    adapter_hash: str | None


def chunk_bounds(n_examples: int, chunk_size: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) slices of at most `chunk_size` examples."""
    return [(start, min(start + chunk_size, n_examples)) for start in range(0, n_examples, chunk_size)]


def create_run(
    session: Session,
    *,
    name: str,
    config: dict[str, Any],
    config_path: str | None,
    base_model: str,
    dataset_path: str,
    dataset_sha256: str,
    variants: Sequence[NewVariant],
    examples: Sequence[NewExample],
    chunk_size: int,
    queue: str | None = None,
) -> Run:
    """Insert a run with its variants, examples and chunks (all `queued`)."""
    bounds = chunk_bounds(len(examples), chunk_size)
    run = Run(
        name=name,
        status=RunStatus.QUEUED,
        config=config,
        config_path=config_path,
        base_model=base_model,
        dataset_path=dataset_path,
        dataset_sha256=dataset_sha256,
        n_examples=len(examples),
        n_chunks=len(bounds),
        queue=queue,
    )
    session.add(run)
    session.flush()  # assigns run.id
    session.add_all(
        Variant(run_id=run.id, name=v.name, position=i, adapter_path=v.adapter_path, adapter_hash=v.adapter_hash)
        for i, v in enumerate(variants)
    )
    session.add_all(Chunk(run_id=run.id, id=i, start_idx=s, end_idx=e) for i, (s, e) in enumerate(bounds))
    session.flush()
    if examples:
        session.execute(
            insert(Example),
            [
                {
                    "run_id": run.id,
                    "idx": ex.idx,
                    "chunk_id": ex.idx // chunk_size,
                    "data": ex.data,
                    "prompt": ex.prompt,
                    "reference": ex.reference,
                    "choices": ex.choices,
                    "answer_index": ex.answer_index,
                }
                for ex in examples
            ],
        )
    return run
