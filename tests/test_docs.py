"""Generated documentation stays in step with the code it documents."""

from __future__ import annotations

from pathlib import Path

from ditplan.spec_reference import COMMAND, reference

EXPERIMENT_FILE = Path(__file__).parents[1] / "docs" / "guides" / "experiment-file.md"


def test_the_experiment_file_reference_is_current():
    assert EXPERIMENT_FILE.read_text() == reference(), f"docs/guides/experiment-file.md is stale; run `{COMMAND}`"
