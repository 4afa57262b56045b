"""The public views `outputs` and `comparisons` (their columns are a stable contract, see DESIGN.md), and
`choice_scores` and `document_scores` (log-likelihood tasks, documented in docs/sql.md); change them
only by adding.

Their SQL lives in the migrations that create or replace them (0001, then 0005 on SQLite, which
rebuilds the tables under them), frozen there: a new definition means a new migration.
"""

from __future__ import annotations

#: The columns each view must have, in order (the tests check them on every backend).
VIEW_COLUMNS = {
    "outputs": [
        "run_id", "example_idx", "variant", "prompt", "reference", "output", "prediction",
        "correct", "output_tokens", "finish_reason",
    ],
    "comparisons": [
        "run_id", "example_idx", "variant", "prompt", "reference", "base_output", "output",
        "base_prediction", "prediction", "base_correct", "correct",
    ],
    # Log-likelihood tasks (migration 0008): each choice's / document's scores, the base model's beside them.
    "choice_scores": [
        "run_id", "example_idx", "variant", "choice_idx", "choice", "is_gold", "logprob", "tokens", "bytes",
        "chars", "greedy", "base_logprob", "delta_logprob",
    ],
    "document_scores": [
        "run_id", "example_idx", "variant", "nll", "tokens", "bytes", "words", "bits_per_byte", "base_nll",
        "delta_nll", "base_bits_per_byte", "delta_bits_per_byte",
    ],
}
