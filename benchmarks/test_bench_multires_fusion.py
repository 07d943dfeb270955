"""pytest-benchmark view of bench_multires_fusion: the same cases, providers, modes and setup.

Run with ``pytest benchmarks --benchmark-only`` (see conftest.py for the environment variables).
Results are grouped per case, mode and memory format, so each group compares the providers;
providers that cannot run here are skipped with the reason ``setup`` gives.
"""

import re

import pytest

import _harness as h
import bench_multires_fusion as bench

QUICK = h.env_flag("HRNAS_BENCH_QUICK", True)
CASES = bench.QUICK_CASES if QUICK else bench.CASES


def _case_id(case: dict) -> str:
    return re.sub(r"[^\w/.]+", "-", bench.label(case).replace("<-", "from"))


@pytest.mark.parametrize("mode", h.MODES)
@pytest.mark.parametrize("provider", bench.PROVIDERS)
@pytest.mark.parametrize("memory_format", bench.MEMORY_FORMATS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_multires_fusion(
    benchmark, bench_device, bench_threads, case, memory_format, provider, mode
):
    prepared = bench.setup(
        case, provider, mode, bench_device, bench.DTYPE, h.MEMORY_FORMATS[memory_format]
    )
    if isinstance(prepared, str):
        pytest.skip(f"{provider}: {prepared}")
    benchmark.group = f"{bench.OP} {bench.label(case)} {memory_format} {mode}"
    benchmark.extra_info.update(
        op=bench.OP, provider=provider, mode=mode, shape=bench.label(case),
        dtype=str(bench.DTYPE).removeprefix("torch."), memory_format=memory_format,
        threads=bench_threads, device=h.device_name(bench_device),
    )
    h.run_pytest_benchmark(benchmark, prepared, bench_device, QUICK)
