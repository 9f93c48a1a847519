"""The tree stays clean under ruff and mypy (pinned in pyproject's test extra)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from .conftest import ROOT


@pytest.mark.parametrize("tool, args", [("ruff", ["check", "altovirt", "tests", "bench"]), ("mypy", [])])
def test_clean(tool: str, args: list[str]) -> None:
    if importlib.util.find_spec(tool) is None:
        pytest.skip(f"SKIPPED LOUDLY: {tool} is not installed; run scripts/setup")
    p = subprocess.run([sys.executable, "-m", tool, *args], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
