"""The schema, as SQLAlchemy 2.0 typed ORM classes.

Tables: `runs` (one per submitted config), `variants` (base + each adapter of a run), `examples`
(each dataset row with its rendered prompt), `chunks` (the unit of work on the queue), `chunk_attempts`
(each claim of a chunk and how it ended) and `generations` (one row per run, example and variant). The
views `outputs` and `comparisons` (public, stable) are created by the migrations. Status, outcome and
finish-reason columns are plain strings in SQL, limited by CHECK constraints to the values of
`db.enums` (migrations 0005 and 0007 add them).
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .enums import BASE_VARIANT, AttemptOutcome, ChunkStatus, FinishReason, RunStatus

__all__ = ["BASE_VARIANT", "MAX_ERROR_CHARS", "Base", "Chunk", "ChunkAttempt", "Example", "Generation", "Run",
           "Variant", "Verification", "utcnow"]

#: The rows of `generations` the generation cache reuses, and indexes: generated (not copied), with a key.
CACHE_SOURCES = text("reused_from IS NULL AND cache_key IS NOT NULL")

#: Longest error text kept on a chunk, attempt or run row.
MAX_ERROR_CHARS = 2000


def _one_of(column: str, values: type[Enum], name: str) -> CheckConstraint:
    """`column IN (...)` over an enum's values: the CHECK constraint migration 0005 creates."""
    listed = ", ".join(f"'{v.value}'" for v in values)
    return CheckConstraint(f"{column} IN ({listed})", name=name)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Run(Base):
    """One submitted run: its configuration, dataset identity and state."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=RunStatus.QUEUED.value, index=True)
    config: Mapped[dict] = mapped_column(JSON)  # the validated config, as a plain dict
    config_path: Mapped[str | None] = mapped_column(Text)
    base_model: Mapped[str] = mapped_column(Text)
    dataset_path: Mapped[str] = mapped_column(Text)
    dataset_sha256: Mapped[str] = mapped_column(String(64))
    n_examples: Mapped[int] = mapped_column(Integer)
    n_chunks: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    queue: Mapped[str | None] = mapped_column(String(200))  # the broker queue of its chunks; null: the default

    __table_args__ = (_one_of("status", RunStatus, "ck_runs_status"),)


class Variant(Base):
    """`base` (`BASE_VARIANT`), or one adapter of a run, with the hash of its files at submission."""

    __tablename__ = "variants"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)  # 0 for base, then the config's order
    adapter_path: Mapped[str | None] = mapped_column(Text)
    adapter_hash: Mapped[str | None] = mapped_column(String(64))


class Example(Base):
    """One dataset row: its position, raw fields, rendered prompt and reference."""

    __tablename__ = "examples"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0-based position in the dataset
    chunk_id: Mapped[int] = mapped_column(Integer)
    data: Mapped[dict] = mapped_column(JSON)
    prompt: Mapped[str] = mapped_column(Text)
    reference: Mapped[str | None] = mapped_column(Text)
    choices: Mapped[list | None] = mapped_column(JSON(none_as_null=True))  # task choice: the rendered choices, in order
    answer_index: Mapped[int | None] = mapped_column(Integer)  # task choice: the gold choice's index

    __table_args__ = (Index("ix_examples_run_chunk", "run_id", "chunk_id"),)


class Chunk(Base):
    """A contiguous slice of a run's examples; the unit of work on the queue."""

    __tablename__ = "chunks"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0-based within the run
    start_idx: Mapped[int] = mapped_column(Integer)
    end_idx: Mapped[int] = mapped_column(Integer)  # exclusive
    status: Mapped[str] = mapped_column(String(16), default=ChunkStatus.QUEUED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    queued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    generate_seconds: Mapped[float | None] = mapped_column(Float)  # time spent in generation
    error: Mapped[str | None] = mapped_column(Text)
    device: Mapped[str | None] = mapped_column(String(32))  # where the chunk was generated: cpu, cuda:0, ...
    dtype: Mapped[str | None] = mapped_column(String(16))  # the weights' dtype as resolved: float32, ...
    # How it was generated when not on the engine's full fast path (an exact fallback and why); null: fast path
    engine: Mapped[str | None] = mapped_column(Text)
    # The claim's lease (migration 0006): the fencing token, incremented at every claim; when the
    # holder's lease runs out unless renewed; the holder's last heartbeat. See db/leases.py.
    lease_token: Mapped[int | None] = mapped_column(Integer)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_chunks_run_status", "run_id", "status"),
        _one_of("status", ChunkStatus, "ck_chunks_status"),
    )


class ChunkAttempt(Base):
    """One attempt at a chunk (migration 0007): who claimed it under which lease, and how it ended.

    `n` numbers a chunk's attempts 1, 2, 3... and is never reset: `retry` keeps the history (it
    resets only `chunks.attempts`, the count the attempt bound uses). See db/attempts.py.
    """

    __tablename__ = "chunk_attempts"

    run_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chunk_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    worker: Mapped[str | None] = mapped_column(String(200))
    lease_token: Mapped[int | None] = mapped_column(Integer)  # the claim's fencing token (null: not a claim)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # null while `running`
    outcome: Mapped[str] = mapped_column(String(16), default=AttemptOutcome.RUNNING.value)
    error: Mapped[str | None] = mapped_column(Text)  # why it ended, when not `done` (at most MAX_ERROR_CHARS)

    __table_args__ = (
        ForeignKeyConstraint(["run_id", "chunk_id"], ["chunks.run_id", "chunks.id"], ondelete="CASCADE",
                             name="fk_chunk_attempts_chunk"),
        _one_of("outcome", AttemptOutcome, "ck_chunk_attempts_outcome"),
    )


class Verification(Base):
    """`lora-compare verify`: how many sampled rows of one variant plain PEFT reproduces."""

    __tablename__ = "verifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    variant: Mapped[str] = mapped_column(String(200))
    sampled: Mapped[int] = mapped_column(Integer)
    agreed: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(32))
    dtype: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # one object per disagreement: example_idx, first differing token, logit gap there
    details: Mapped[list] = mapped_column(JSON)


class Generation(Base):
    """One output: a run's example through one variant. Unique per (run, example, variant)."""

    __tablename__ = "generations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(Integer)
    example_idx: Mapped[int] = mapped_column(Integer)
    variant: Mapped[str] = mapped_column(String(200))
    chunk_id: Mapped[int] = mapped_column(Integer)
    output: Mapped[str] = mapped_column(Text)
    prediction: Mapped[str | None] = mapped_column(Text)
    correct: Mapped[bool | None] = mapped_column(Boolean)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    finish_reason: Mapped[str] = mapped_column(String(16))
    base_model_hash: Mapped[str] = mapped_column(String(64))
    adapter_hash: Mapped[str | None] = mapped_column(String(64))  # null for base rows
    worker: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # sha256 of (base hash, adapter hash, prompt tokens, generation settings); null when sampling
    cache_key: Mapped[str | None] = mapped_column(String(64))
    reused_from: Mapped[int | None] = mapped_column(Integer)  # the generation this output was copied from
    output_ids: Mapped[list | None] = mapped_column(JSON)  # the generated token ids (EOS included when hit)

    __table_args__ = (
        UniqueConstraint("run_id", "example_idx", "variant", name="uq_generations_run_example_variant"),
        _one_of("finish_reason", FinishReason, "ck_generations_finish_reason"),
        ForeignKeyConstraint(
            ["run_id", "example_idx"], ["examples.run_id", "examples.idx"], ondelete="CASCADE"
        ),
        # The generation cache's index (migration 0009): only outputs a key can be reused from (generated,
        # not copies), in id order within a key, so a lookup reads one entry per key (db.outputs).
        Index("ix_generations_cache_key", "cache_key", "id", postgresql_where=CACHE_SOURCES,
              sqlite_where=CACHE_SOURCES),
    )


class Loglikelihood(Base):
    """A log-likelihood task's scores (migration 0008). Task choice: one row per answer choice of each
    (example, variant), `choice_idx` its position; task perplexity: one row per (example, variant),
    `choice_idx` 0, for the whole document. Written with its `generations` row, in one transaction."""

    __tablename__ = "loglikelihoods"

    run_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    example_idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    variant: Mapped[str] = mapped_column(String(200), primary_key=True)
    choice_idx: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    logprob: Mapped[float] = mapped_column(Double)  # sum of the scored tokens' natural-log probabilities
    tokens: Mapped[int] = mapped_column(Integer)  # tokens scored (the choice's continuation; the whole document)
    bytes: Mapped[int] = mapped_column(Integer)  # UTF-8 bytes of the choice's text / of the document
    chars: Mapped[int] = mapped_column(Integer)  # characters of the same (acc_norm divides by these)
    words: Mapped[int | None] = mapped_column(Integer)  # perplexity: the document's words (null for choices)
    greedy: Mapped[bool | None] = mapped_column(Boolean)  # choice: every token of the choice is the argmax

    __table_args__ = (
        ForeignKeyConstraint(["run_id", "example_idx"], ["examples.run_id", "examples.idx"], ondelete="CASCADE",
                             name="fk_loglikelihoods_example"),
    )
