"""The critical path's one definition: bootstrap.py's critical_path against
the shared vectors in fixtures/critical-path/ (test/timings.test.ts runs
the same files through src/timings.ts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import bootstrap
import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "critical-path"
VECTORS = [pytest.param(json.loads(p.read_text(encoding="utf-8")), id=p.stem) for p in sorted(FIXTURES.glob("*.json"))]


def test_there_are_enough_vectors() -> None:
    assert len(VECTORS) >= 8


@pytest.mark.parametrize("vector", VECTORS)
def test_critical_path_vector(vector: dict[str, Any]) -> None:
    if "error" in vector:
        with pytest.raises(ValueError, match=vector["error"]):
            bootstrap.critical_path(vector["steps"])
        return
    path, seconds = bootstrap.critical_path(vector["steps"])
    assert path == vector["path"]
    assert seconds == pytest.approx(vector["seconds"], abs=1e-9)
