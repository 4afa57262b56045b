"""The public views. Their columns are a stable contract (see DESIGN.md); change them only by adding."""

from __future__ import annotations

#: `outputs`: one row per (run, example, variant), base included.
OUTPUTS_VIEW = """
CREATE VIEW outputs AS
SELECT g.run_id, g.example_idx, g.variant, e.prompt, e.reference, g.output, g.prediction,
       g.correct, g.output_tokens, g.finish_reason
FROM generations g
JOIN examples e ON e.run_id = g.run_id AND e.idx = g.example_idx
"""

#: `comparisons`: one row per (run, example, adapter), the base row beside it.
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
