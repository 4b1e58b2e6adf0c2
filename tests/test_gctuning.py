"""gctuning.tune_gc, in a fresh interpreter (freezing is process-wide)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gpuflow.gctuning import tune_gc

PROBE = """
import gc, json, sys
from gpuflow.gctuning import tune_gc
before = gc.get_threshold()
tune_gc(int(sys.argv[1]))
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": gc.get_freeze_count()}))
"""


def run_probe(threshold: int) -> dict[str, list[int] | int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(threshold)], capture_output=True, timeout=60, check=True
    )
    return dict(json.loads(out.stdout))


def test_threshold_set_and_startup_objects_frozen() -> None:
    state = run_probe(5000)
    before, after = state["before"], state["after"]
    assert isinstance(before, list) and isinstance(after, list)
    assert after == [5000, before[1], before[2]]
    assert isinstance(state["frozen"], int) and state["frozen"] > 100


def test_zero_keeps_pythons_thresholds() -> None:
    state = run_probe(0)
    assert state["after"] == state["before"]
    assert isinstance(state["frozen"], int) and state["frozen"] > 100


def test_negative_threshold_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        tune_gc(-1)
