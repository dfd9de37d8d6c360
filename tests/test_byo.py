"""The "Bring your own model" examples run exactly as written (README and docs/)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _harness import one_thread

ROOT = Path(__file__).resolve().parents[1]


def _block(path: Path, heading: str) -> str:
    """The first ```python block after ``heading`` in ``path``."""
    text = path.read_text()
    assert heading in text, f"{path.name} has no {heading!r}"
    section = text.split(heading, 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # tiny models: one thread avoids oversubscription
        yield


@pytest.mark.parametrize(
    "path,heading",
    [
        ("README.md", "## Bring your own model"),
        ("docs/BRING_YOUR_OWN_MODEL.md", "## The example"),
    ],
)
def test_example_runs_as_written(path, heading, capsys):
    code = _block(ROOT / path, heading)
    scope: dict = {"__name__": "__byo__"}
    exec(compile(code, str(ROOT / path), "exec"), scope)
    out = capsys.readouterr().out
    assert "train accuracy" in out
    # the example's own objects: trained, with the NaN rows of a missing view ignored
    assert all(torch.isfinite(p).all() for p in scope["model"].parameters())
    assert scope["tla"].lazy is not None
    assert float(scope["accuracy"]) > 1.0 / scope["C"]  # better than chance
