"""The benchmark harness's CPU timing order (benchmarks/_harness.py): cases grouped by
``run(interleave=...)`` are timed in the same alternating rounds, the others one after another,
and the table and CSV keep the script's case order either way."""

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _harness as h  # noqa: E402

CASES = [dict(shape=1, alive=1.0), dict(shape=2, alive=1.0), dict(shape=1, alive=0.25)]
PROVIDERS = ("eager", "native")


def _label(case):
    return f"shape {case['shape']} alive {case['alive']:.0%}"


def _run(tmp_path, interleave):
    """The call order of a tiny run (each timed call logs its case label) and the CSV rows."""
    calls = []

    def setup(case, provider, mode, device, dtype, memory_format):
        return h.Prepared(fn=lambda: calls.append(_label(case)))

    out = tmp_path / "rows.csv"
    argv = ["--threads", "1", "--modes", "forward", "--min-run-time", "0.01", "--out", str(out)]
    args = h.parse_args(__doc__, argv)
    code = h.run(
        op="harness_test",
        cases=CASES,
        quick_cases=CASES,
        providers=PROVIDERS,
        baseline="eager",
        setup=setup,
        label=_label,
        args=args,
        interleave=interleave,
    )
    assert code == 0
    with open(out, newline="") as f:
        rows = [(r["shape"], r["provider"]) for r in csv.DictReader(f)]
    return calls, rows


def _spans(calls):
    """The index range [first, last] over which each label was called."""
    spans = {}
    for i, name in enumerate(calls):
        first, _ = spans.get(name, (i, i))
        spans[name] = (first, i)
    return spans


@pytest.mark.parametrize("grouped", [False, True], ids=["alone", "grouped"])
def test_interleave_groups_cases(tmp_path, grouped):
    calls, rows = _run(tmp_path, h.all_but("alive") if grouped else None)
    spans = _spans(calls)
    full, other, quarter = (_label(c) for c in CASES)
    overlap = spans[full][1] > spans[quarter][0] and spans[quarter][1] > spans[full][0]
    # grouped: the 100% and 25% cases alternate in the same rounds; alone: one after the other
    assert overlap == grouped
    # the ungrouped shape is never timed inside the others' rounds
    assert spans[other][0] > spans[full][1] or spans[other][1] < spans[full][0]
    expected = [(_label(c), p) for c in CASES for p in PROVIDERS]
    assert rows == expected
