"""Fixtures of the pytest-benchmark suite (``pytest benchmarks --benchmark-only``).

The suite is not collected by a plain ``pytest`` (pyproject ``testpaths = ["tests"]``). Environment:

* ``HRNAS_BENCH_QUICK``: ``1`` (default) runs each script's ``QUICK_CASES`` with a fixed number of
  rounds, a smoke test of about a minute; ``0`` runs the full ``CASES`` with pytest-benchmark's
  own calibration;
* ``HRNAS_BENCH_DEVICE``: ``cpu`` or ``cuda`` (default: ``cuda`` when available);
* ``HRNAS_BENCH_THREADS``: CPU threads for the whole session (default: torch's current count).
"""

import os
import sys
from pathlib import Path

import pytest
import torch

# The bench scripts import ``_harness`` as a sibling module, as ``python benchmarks/bench_x.py``
# sees it; make that hold under any pytest import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def bench_device() -> str:
    default = "cuda" if torch.cuda.is_available() else "cpu"
    device = os.environ.get("HRNAS_BENCH_DEVICE") or default
    if device not in ("cpu", "cuda"):
        pytest.fail(f"HRNAS_BENCH_DEVICE must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("HRNAS_BENCH_DEVICE=cuda but CUDA is not available")
    return device


@pytest.fixture(scope="session", autouse=True)
def bench_threads():
    previous = torch.get_num_threads()
    threads = int(os.environ.get("HRNAS_BENCH_THREADS") or previous)
    torch.set_num_threads(threads)
    yield threads
    torch.set_num_threads(previous)
