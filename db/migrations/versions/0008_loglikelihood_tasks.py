"""log-likelihood tasks: answer choices, their scores, and the views over them

- `examples.choices` (JSON, the rendered choices in order) and `examples.answer_index` (the gold
  choice): null except in `task: choice` runs.
- `loglikelihoods`: a log-likelihood task's scores, one row per answer choice of each (example, variant)
  (`task: choice`), or one per (example, variant) for the whole document (`task: perplexity`,
  `choice_idx` 0). Primary key (run_id, example_idx, variant, choice_idx); its foreign key to
  `examples` cascades, like every child of a run.
- `generations.finish_reason` may also be `scored` (such a run's rows are scored, not generated):
  the CHECK constraint of 0005 is replaced (on SQLite, `generations` is rebuilt with the views
  dropped and created again around it, as 0005 did).
- Two views, `choice_scores` and `document_scores`: each (example, variant)'s scores with the base
  model's beside them and the adapter-minus-base difference.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEFORE = ("eos", "stop", "length", "empty_prompt", "prompt_too_long")
AFTER = (*BEFORE, "scored")
CHECK = "ck_generations_finish_reason"

# The public views as of this revision (unchanged since 0001), frozen here; SQLite only.
OUTPUTS_VIEW = """
CREATE VIEW outputs AS
SELECT g.run_id, g.example_idx, g.variant, e.prompt, e.reference, g.output, g.prediction,
       g.correct, g.output_tokens, g.finish_reason
FROM generations g
JOIN examples e ON e.run_id = g.run_id AND e.idx = g.example_idx
"""

COMPARISONS_VIEW = """
CREATE VIEW comparisons AS
SELECT a.run_id, a.example_idx, a.variant, e.prompt, e.reference,
       b.output AS base_output, a.output, b.prediction AS base_prediction, a.prediction,
       b.correct AS base_correct, a.correct
FROM generations a
JOIN generations b ON b.run_id = a.run_id AND b.example_idx = a.example_idx AND b.variant = 'base'
JOIN examples e ON e.run_id = a.run_id AND e.idx = a.example_idx
WHERE a.variant <> 'base'
"""

# {choice}: the choice's text out of the examples.choices JSON array, in each dialect.
CHOICE_TEXT = {"sqlite": "json_extract(e.choices, '$[' || l.choice_idx || ']')",
               "postgresql": "(e.choices ->> l.choice_idx)"}

CHOICE_SCORES_VIEW = """
CREATE VIEW choice_scores AS
SELECT l.run_id, l.example_idx, l.variant, l.choice_idx, {choice} AS choice,
       (l.choice_idx = e.answer_index) AS is_gold,
       l.logprob, l.tokens, l.bytes, l.chars, l.greedy,
       b.logprob AS base_logprob, l.logprob - b.logprob AS delta_logprob
FROM loglikelihoods l
JOIN examples e ON e.run_id = l.run_id AND e.idx = l.example_idx
LEFT JOIN loglikelihoods b ON b.run_id = l.run_id AND b.example_idx = l.example_idx
     AND b.choice_idx = l.choice_idx AND b.variant = 'base'
WHERE e.answer_index IS NOT NULL
"""

DOCUMENT_SCORES_VIEW = """
CREATE VIEW document_scores AS
SELECT l.run_id, l.example_idx, l.variant, -l.logprob AS nll, l.tokens, l.bytes, l.words,
       -l.logprob / l.bytes / 0.6931471805599453 AS bits_per_byte,
       -b.logprob AS base_nll, b.logprob - l.logprob AS delta_nll,
       -b.logprob / b.bytes / 0.6931471805599453 AS base_bits_per_byte,
       (b.logprob - l.logprob) / l.bytes / 0.6931471805599453 AS delta_bits_per_byte
FROM loglikelihoods l
JOIN examples e ON e.run_id = l.run_id AND e.idx = l.example_idx
LEFT JOIN loglikelihoods b ON b.run_id = l.run_id AND b.example_idx = l.example_idx
     AND b.choice_idx = l.choice_idx AND b.variant = 'base'
WHERE e.answer_index IS NULL
"""


def _condition(values: Sequence[str]) -> str:
    return f"finish_reason IN ({', '.join(repr(v) for v in values)})"


def _replace_check(values: Sequence[str]) -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.drop_constraint(CHECK, "generations", type_="check")
        op.create_check_constraint(CHECK, "generations", _condition(values))
        return
    bind = op.get_bind()
    if bind.exec_driver_sql("PRAGMA foreign_keys").scalar() and bind.execute(sa.text("SELECT 1 FROM runs")).first():
        raise RuntimeError("rebuilding `generations` on SQLite with foreign keys on could delete rows: "
                           "migrate with them off (`lora-compare db upgrade` does)")
    op.execute("DROP VIEW comparisons")
    op.execute("DROP VIEW outputs")
    with op.batch_alter_table("generations", recreate="always") as batch:
        batch.drop_constraint(CHECK, type_="check")
        batch.create_check_constraint(CHECK, _condition(values))
    op.execute(OUTPUTS_VIEW)
    op.execute(COMPARISONS_VIEW)


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.add_column("examples", sa.Column("choices", sa.JSON(), nullable=True))
    op.add_column("examples", sa.Column("answer_index", sa.Integer(), nullable=True))
    op.create_table(
        "loglikelihoods",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("example_idx", sa.Integer(), nullable=False),
        sa.Column("variant", sa.String(length=200), nullable=False),
        sa.Column("choice_idx", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("logprob", sa.Double(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("chars", sa.Integer(), nullable=False),
        sa.Column("words", sa.Integer(), nullable=True),
        sa.Column("greedy", sa.Boolean(), nullable=True),
        sa.PrimaryKeyConstraint("run_id", "example_idx", "variant", "choice_idx"),
        sa.ForeignKeyConstraint(["run_id", "example_idx"], ["examples.run_id", "examples.idx"], ondelete="CASCADE",
                                name="fk_loglikelihoods_example"),
    )
    _replace_check(AFTER)
    op.execute(CHOICE_SCORES_VIEW.format(choice=CHOICE_TEXT[dialect]))
    op.execute(DOCUMENT_SCORES_VIEW)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT 1 FROM generations WHERE finish_reason = 'scored'")).first():
        raise RuntimeError("generations holds log-likelihood rows (finish_reason 'scored'): delete those runs "
                           "before downgrading below 0008")
    op.execute("DROP VIEW document_scores")
    op.execute("DROP VIEW choice_scores")
    _replace_check(BEFORE)
    op.drop_table("loglikelihoods")
    with op.batch_alter_table("examples") as batch:
        batch.drop_column("answer_index")
        batch.drop_column("choices")
