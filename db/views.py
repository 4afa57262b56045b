"""The public views `outputs` and `comparisons`. Their columns are a stable contract (see DESIGN.md);
change them only by adding.

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
}
