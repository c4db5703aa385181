"""Generated documentation stays in step with the code it documents."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import ditplan
from ditplan.plan import PlanError
from ditplan.spec_reference import COMMAND, reference
from ditplan.strategies.apply import get_runtime

EXPERIMENT_FILE = Path(__file__).parents[1] / "docs" / "guides" / "experiment-file.md"
README = Path(__file__).parents[1] / "README.md"


def test_the_experiment_file_reference_is_current():
    assert EXPERIMENT_FILE.read_text() == reference(), f"docs/guides/experiment-file.md is stale; run `{COMMAND}`"


def readme_snippet(section: str) -> str:
    """The first Python block under the README heading ``section``."""
    text = README.read_text()
    return re.search(rf"## {re.escape(section)}\n.*?```python\n(.*?)```", text, re.S).group(1)


def test_the_readmes_taste_runs_as_written(capsys):
    """The two-minute taste: the shipped plan applied to the embedded pipeline, timed against dense."""
    namespace: dict = {}
    exec(compile(readme_snippet("A two-minute taste"), "README.md", "exec"), namespace)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ditplan.summary(ditplan.shipped_plan("quickstart-knee"))
    assert re.fullmatch(r"\d+\.\dx faster on this machine", out[1])
    assert get_runtime(namespace["pipe"].transformer) is None  # removed: the pipeline is as before


def test_an_unknown_shipped_plan_is_one_line_naming_the_closest():
    with pytest.raises(PlanError, match=r"no shipped plan 'quickstart-kne'.*quickstart-knee"):
        ditplan.shipped_plan("quickstart-kne")


def test_a_sections_docstring_gives_its_fields_their_descriptions():
    from ditplan.spec_reference import field_docs

    doc = "How it runs.\n\nkind: what it is.\nsource: where it comes from. seed: its seed.\n\nMore words."
    assert field_docs(doc, ["kind", "source", "seed", "from"]) == (
        "How it runs. More words.", {"kind": "what it is.", "source": "where it comes from.", "seed": "its seed."})
