"""Benchmark harness shared by every op of hrnas_kernels: one timing method, CSV schema and table.

Each ``bench_<op>.py`` declares what to measure and nothing else:

* ``CASES``: a list of dicts of shape parameters (and ``QUICK_CASES``, derived from ``CASES``,
  for smoke runs), plus ``label(case)`` giving the compact shape string of a case;
* ``PROVIDERS``: the implementations to compare (``"eager"``, ``"eager+compile"``, ``"native"``,
  ``"triton"``, ...) and ``BASELINE``, the provider every speedup is measured against;
* ``setup(case, provider, mode, device, dtype, memory_format)``: builds the inputs and returns a
  ``Prepared`` (the zero-argument callable to time, the tensors whose ``.grad`` must be reset
  between calls, and optionally the compulsory bytes one call moves), or a string saying why the
  provider cannot run here (implementation not built, Triton on CPU, compile failure).

and hands them to ``run()``. The script also serves the pytest-benchmark suite
(``test_bench_<op>.py``), which reuses ``CASES`` and ``setup`` through ``run_pytest_benchmark``.

Modes (``autograd_call`` builds them from a forward closure; inputs always require grad, so
``forward`` is the training forward that records the graph):

* ``forward``: the forward alone;
* ``backward``: the backward alone, replayed on one forward graph recorded during setup
  (``torch.autograd.grad(out, inputs, grad_out, retain_graph=True)``). This times the backward
  kernels exactly instead of estimating them as full minus forward, whose noise on a shared
  machine is the sum of two measurements. (A torch.compile'd backward that donates buffers
  refuses ``retain_graph``: compile that mode with ``donated_buffer=False``, as
  bench_multires_fusion does);
* ``full``: forward then backward, graph freed each call.

Gradients are returned by ``torch.autograd.grad``, never accumulated into ``.grad``.

Timing: CUDA uses ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])``, which flushes L2
before each call (CUDA events with the same flush when Triton is missing). CPU uses
``torch.utils.benchmark.Timer(...).blocked_autorange(...)`` under the requested thread count,
interleaved: the providers of one (case, mode) (and of every case a script groups with it through
``run(interleave=...)``) are prepared together and timed in ``CPU_ROUNDS`` rounds of
``min_run_time / CPU_ROUNDS`` each, the order rotating every round, until each has at least
``MIN_CPU_SAMPLES`` blocks; p20/p50/p80 are taken over the per-call means of the blocks. On a
machine whose speed drifts within seconds (a shared VM), the baseline and the providers (and
the grouped cases) then see the same drift, and the ratios in a row (and between grouped rows)
stay comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import datetime
import itertools
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils import benchmark as torch_benchmark

import hrnas_kernels

MODES = ("forward", "backward", "full")
MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
CSV_COLUMNS = (
    "op",
    "provider",
    "mode",
    "shape",
    "dtype",
    "memory_format",
    "threads",
    "device",
    "torch_version",
    "git_sha",
    "p20_ms",
    "p50_ms",
    "p80_ms",
    "peak_mem_mb",
    "speedup_vs",
    "baseline",
    "gbps",
    "frac_peak",
    "timestamp",
)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
MIN_CPU_SAMPLES = 5
CPU_ROUNDS = 5
DEFAULT_MIN_RUN_TIME = 1.0
QUICK_MIN_RUN_TIME = 0.2
# Peak HBM bandwidth used for frac_peak on CUDA: about what an H100 80GB HBM3 reaches on a
# device-to-device copy counting read + write (3.35 TB/s nominal); see docs PERFORMANCE.md 1.1.
DEFAULT_CUDA_PEAK_GBPS = 3000.0
QUICK_PYTEST_ROUNDS = 10


@dataclass
class Prepared:
    """What ``setup`` returns for a provider that can run: the call to time and its bookkeeping."""

    fn: Callable[[], object]
    grad_to_none: Sequence[torch.Tensor] = field(default_factory=tuple)
    nbytes: int | None = None  # compulsory bytes one call reads + writes, for GB/s
    # Settings the calls need (a config patch, say), entered once around warm-up and timing
    # rather than paid inside every timed call.
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@dataclass
class _Result:
    p20: float
    p50: float
    p80: float
    peak_mem_mb: float | None
    nbytes: int | None


def autograd_call(
    forward: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor], mode: str
) -> Callable[[], object]:
    """The callable timed for ``mode``, built from a closure running the op on ``inputs``.

    ``backward`` records one forward graph here and replays only its backward on every call;
    ``grad_out`` is random (seeded, laid out like the output) so no gradient is trivially zero.
    """
    if mode == "forward":
        return forward
    out = forward()
    gen = torch.Generator(device=out.device).manual_seed(0)
    grad_out = torch.empty_like(out).normal_(generator=gen)
    inputs = tuple(inputs)
    if mode == "backward":
        return lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
    if mode == "full":
        return lambda: torch.autograd.grad(forward(), inputs, grad_out)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def device_name(device: str) -> str:
    """The name rows are compared by: the GPU name on CUDA, the CPU model name on CPU."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown-cpu"


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_sha() -> str:
    """Short HEAD sha, ``-dirty`` when anything outside benchmarks/results differs from HEAD;
    ``HRNAS_GIT_SHA`` when set (a copy of the tree without .git, as on a lent GPU machine)."""
    if os.environ.get("HRNAS_GIT_SHA"):
        return os.environ["HRNAS_GIT_SHA"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = any(not line[3:].startswith("benchmarks/results/") for line in status)
    return sha + ("-dirty" if dirty else "")


# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> str:
    """Makes glibc's malloc keep freed memory in the process, and says what it did.

    By default glibc maps blocks above a (moving) threshold and unmaps them on free, and trims the
    heap's top, so a composition that allocates its intermediates anew on every call (the eager
    providers) page-faults them in again on every call. On the 2-core development VM that cost
    moved with the host: the eager channels_last dwconv forward took 16.8-21.8 ms with 5,800 page
    faults per call, and 7.5-8.0 ms with freed memory kept (2026-11-24, perf stat), while the
    native ops, whose outputs come from a pool, did not change. Kept memory (blocks up to 32 MiB
    from the heap, no trimming) times the computation, not the hypervisor's page faults; it
    applies to every provider alike. ``--system-malloc`` leaves glibc's defaults.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "allocator defaults (no glibc mallopt)"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(
        mallopt(param, value)
        for param, value in (
            (_M_MMAP_THRESHOLD, 32 << 20),
            (_M_TRIM_THRESHOLD, 1 << 30),
            (_M_TOP_PAD, 64 << 20),
        )
    )
    return "malloc keeps freed memory" if ok else "allocator defaults (mallopt refused)"


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return "n/a"


def _with_grad_reset(fn, grad_to_none):
    if not grad_to_none:
        return fn

    def call():
        for t in grad_to_none:
            t.grad = None
        return fn()

    return call


def _quantiles_ms(times: Sequence[float]) -> tuple[float, float, float]:
    p20, p50, p80 = np.quantile(np.asarray(times) * 1e3, [0.2, 0.5, 0.8])
    return float(p20), float(p50), float(p80)


def measure_cpu_interleaved(
    prepared: dict, threads: int, min_run_time: float
) -> dict[object, _Result | Exception]:
    """Time several callables (the providers of one (case, mode), or of a group of cases) on CPU
    in alternating rounds (see the module docstring), keyed as ``prepared``; one whose call
    raises gets its exception and leaves the rounds."""
    out: dict[object, _Result | Exception] = {}
    timers, times = {}, {}
    for name, prep in prepared.items():
        fn = _with_grad_reset(prep.fn, prep.grad_to_none)
        try:
            with prep.context():
                fn()  # warm-up
        except Exception as error:  # reported by the caller; the others go on
            out[name] = error
            continue
        timers[name] = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
        times[name] = []
    names = list(timers)
    rounds = 0
    while names and (rounds < CPU_ROUNDS or min(len(times[n]) for n in names) < MIN_CPU_SAMPLES):
        for name in names[rounds % len(names) :] + names[: rounds % len(names)]:
            if name in out:
                continue
            try:
                with prepared[name].context():
                    blocks = timers[name].blocked_autorange(min_run_time=min_run_time / CPU_ROUNDS)
                times[name].extend(blocks.times)
            except Exception as error:
                out[name] = error
        names = [n for n in names if n not in out]
        rounds += 1
    for name in names:
        out[name] = _Result(*_quantiles_ms(times[name]), None, prepared[name].nbytes)
    return out


def _time_cuda(fn, grad_to_none, min_run_time: float) -> tuple[float, float, float]:
    rep_ms = max(1, int(min_run_time * 1e3))
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_cuda_events(fn, grad_to_none, rep_ms)
    p50, p20, p80 = do_bench(
        fn, rep=rep_ms, grad_to_none=list(grad_to_none) or None, quantiles=[0.5, 0.2, 0.8]
    )
    return p20, p50, p80


def _time_cuda_events(fn, grad_to_none, rep_ms: int) -> tuple[float, float, float]:
    """do_bench's method without Triton: warm-up, then one event pair per call, L2 flushed."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(25 / estimate))):
        fn()
    n = max(MIN_CPU_SAMPLES, int(rep_ms / estimate))
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(n)
    ]
    for s, e in events:
        for t in grad_to_none:
            t.grad = None
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in events]
    p20, p50, p80 = np.quantile(times, [0.2, 0.5, 0.8])
    return float(p20), float(p50), float(p80)


def _peak_mem_mb(fn) -> float:
    """CUDA max_memory_allocated over one call, live inputs (and a retained graph) included."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def measure(prepared: Prepared, device: str, threads: int, min_run_time: float) -> _Result:
    """Warm up once, then time ``prepared.fn`` alone; exceptions from the op propagate."""
    fn = _with_grad_reset(prepared.fn, prepared.grad_to_none)
    with prepared.context():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
            peak = _peak_mem_mb(fn)
            p20, p50, p80 = _time_cuda(prepared.fn, prepared.grad_to_none, min_run_time)
        else:
            peak = None
            result = measure_cpu_interleaved({"fn": prepared}, threads, min_run_time)["fn"]
            if isinstance(result, Exception):
                raise result
            p20, p50, p80 = result.p20, result.p50, result.p80
    return _Result(p20, p50, p80, peak, prepared.nbytes)


def selected_formats(args: argparse.Namespace, declared: Sequence[str]) -> list[str]:
    """The memory formats to measure: ``--memory-format``'s one, or every one the script
    declares (no flag, or ``both``)."""
    return list(declared) if args.memory_format in (None, "both") else [args.memory_format]


def parse_args(
    description: str | None = None,
    argv: Sequence[str] | None = None,
    modes: Sequence[str] = MODES,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
):
    """The command line every ``bench_<op>.py`` shares; options left ``None`` take the script's
    defaults in ``run``. ``modes`` are the ones measured when ``--modes`` is not given;
    ``extra(parser)`` adds a script's own options."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if extra is not None:
        extra(p)
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--dtype", nargs="+", default=["float32"], help="torch dtype names")
    p.add_argument(
        "--threads",
        nargs="+",
        type=int,
        help="CPU thread counts (torch.set_num_threads); default: the script's",
    )
    p.add_argument(
        "--memory-format",
        choices=("nchw", "channels_last", "both"),
        help="default: every format the script declares",
    )
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(modes))
    p.add_argument("--providers", nargs="+", help="subset of the script's providers")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"QUICK_CASES and min-run-time {QUICK_MIN_RUN_TIME} s, for smoke tests",
    )
    p.add_argument(
        "--min-run-time",
        type=float,
        help=f"seconds of timed calls per measurement (default {DEFAULT_MIN_RUN_TIME}; "
        "CUDA: do_bench rep)",
    )
    p.add_argument(
        "--peak-gbps",
        type=float,
        help="peak memory bandwidth for frac_peak, GB/s (default on CUDA "
        f"{DEFAULT_CUDA_PEAK_GBPS:g}: H100 80GB HBM3 copy; on CPU none)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="CSV to append to (default benchmarks/results/<op>_<device-slug>.csv)",
    )
    p.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc's malloc defaults (by default freed memory is kept in the process, so "
        "eager intermediates are not page-faulted in on every call; see keep_freed_memory)",
    )
    args = p.parse_args(argv)
    for name in args.dtype:
        if not isinstance(getattr(torch, name, None), torch.dtype):
            p.error(f"--dtype: {name!r} is not a torch dtype")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    if args.threads and min(args.threads) < 1:
        p.error("--threads must be positive")
    return args


def _open_csv(path: Path, columns: Sequence[str] = CSV_COLUMNS):
    """``(file, csv.DictWriter)`` appending to ``path``: a new file gets the ``columns`` header,
    an existing one must already have it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if tuple(header or ()) != tuple(columns):
            sys.exit(f"{path} has another header ({header}); pass another --out")
        f = open(path, "a", newline="")
        return f, csv.DictWriter(f, columns)
    f = open(path, "w", newline="")
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    return f, writer


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _print_block(title, labels, modes, providers, baseline, cells, notes):
    header = ["case", "mode"] + list(providers)
    rows = []
    for label in labels:
        for mode in modes:
            row = [label, mode]
            for provider in providers:
                cell = cells.get((label, mode, provider), "-")
                if isinstance(cell, _Result):
                    base = cells.get((label, mode, baseline))
                    text = f"{cell.p50:.3f}"
                    if isinstance(base, _Result):
                        text += f" {base.p50 / cell.p50:.2f}x"
                    if cell.nbytes:
                        text += f" {cell.nbytes / cell.p50 / 1e6:.3g}GB/s"
                    cell = text
                row.append(cell)
            rows.append(row)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = [f"[{title}]", "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines += [f"  [{i}] {note}" for i, note in enumerate(notes, start=1)]
    print("\n".join(lines) + "\n", flush=True)


def _measure_block(
    cases, labels, providers, modes, setup, device, dtype, fmt, threads, min_run_time, interleave
):
    """Results of one (threads, dtype, memory format) block: cells keyed (label, mode, provider)
    holding a ``_Result`` or a footnote marker (in case, mode, provider order), the footnotes,
    and the number of errors. On CPU the providers of a (case, mode) are set up together and
    timed interleaved, and so are those of every case with the same ``interleave(case)`` key
    (each case alone without one); on CUDA one at a time."""
    cells, notes, errors = {}, [], 0
    groups: dict = {}
    for case, case_label in zip(cases, labels):
        key = interleave(case) if interleave else case_label
        groups.setdefault(key, []).append((case, case_label))

    def footnote(key, kind, note):
        if note not in notes:
            notes.append(note)
        cells[key] = f"{kind}[{notes.index(note) + 1}]"

    def error_note(provider, mode, error):
        return f"{provider} {mode}: error: {type(error).__name__}: {error}"

    for group in groups.values():
        for mode in modes:
            ready = {}
            for case, case_label in group:
                for provider in providers:
                    key = (case_label, mode, provider)
                    try:
                        prepared = setup(case, provider, mode, device, dtype, MEMORY_FORMATS[fmt])
                        if isinstance(prepared, str):
                            footnote(key, "skip", f"{provider}: skipped: {prepared}")
                        elif device == "cpu":
                            ready[key] = prepared
                        else:
                            cells[key] = measure(prepared, device, threads, min_run_time)
                    except Exception as error:  # reported in the table; the run goes on
                        errors += 1
                        footnote(key, "error", error_note(provider, mode, error))
                    finally:
                        prepared = None  # free the inputs and graphs before the next setup
            if ready:
                results = measure_cpu_interleaved(ready, threads, min_run_time)
                ready = None
                for key, result in results.items():
                    if isinstance(result, Exception):
                        errors += 1
                        footnote(key, "error", error_note(key[2], mode, result))
                    else:
                        cells[key] = result
    order = {key: i for i, key in enumerate(itertools.product(labels, modes, providers))}
    return dict(sorted(cells.items(), key=lambda kv: order[kv[0]])), notes, errors


def all_but(*names: str) -> Callable[[dict], tuple]:
    """An ``interleave`` key for ``run``: cases that differ only in ``names`` are timed together."""
    return lambda case: tuple(sorted((k, v) for k, v in case.items() if k not in names))


def _rows(cells, baseline, peak_gbps, common):
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for (case_label, mode, provider), res in cells.items():
        if not isinstance(res, _Result):
            continue
        base = cells.get((case_label, mode, baseline))
        gbps = res.nbytes / res.p50 / 1e6 if res.nbytes else None
        frac = gbps / peak_gbps if gbps is not None and peak_gbps else None
        yield {
            **common,
            "provider": provider,
            "mode": mode,
            "shape": case_label,
            "p20_ms": f"{res.p20:.6g}",
            "p50_ms": f"{res.p50:.6g}",
            "p80_ms": f"{res.p80:.6g}",
            "peak_mem_mb": _fmt(res.peak_mem_mb, ".1f"),
            "speedup_vs": f"{base.p50 / res.p50:.4g}" if isinstance(base, _Result) else "",
            "baseline": baseline,
            "gbps": _fmt(gbps, ".4g"),
            "frac_peak": _fmt(frac, ".4g"),
            "timestamp": stamp,
        }


def run(
    *,
    op: str,
    cases: Sequence[dict],
    quick_cases: Sequence[dict],
    providers: Sequence[str],
    baseline: str,
    setup: Callable,
    label: Callable[[dict], str],
    args: argparse.Namespace,
    threads: Sequence[int] = (1, 2),
    memory_formats: Sequence[str] = ("nchw",),
    interleave: Callable[[dict], object] | None = None,
) -> int:
    """Measure every (threads, dtype, memory format, case, provider, mode); returns the exit code.

    ``interleave(case)``, when given, keys groups of cases that are timed together on CPU: all
    their providers in the same alternating rounds, so ratios between the cases of a group (the
    alive-fraction criteria: 25% alive against 100%) come from the same minutes of a machine
    whose speed drifts, as the speedups within a case do.

    Rows are appended to the CSV block by block (one block per thread count, dtype and memory
    format), so an interrupted run keeps what it measured. A provider whose ``setup`` returns a
    reason is reported as skipped; one that raises is reported as an error, and the exit code is 1.
    """
    device = args.device
    if args.providers:
        unknown = sorted(set(args.providers) - set(providers))
        if unknown:
            sys.exit(f"unknown provider(s) {unknown}; {op} has {list(providers)}")
        providers = [p for p in providers if p in args.providers]
    cases = quick_cases if args.quick else cases
    labels = [label(c) for c in cases]
    if len(set(labels)) != len(labels):
        sys.exit(f"{op}: label() gives two cases the same shape string: {labels}")
    min_run_time = args.min_run_time or (QUICK_MIN_RUN_TIME if args.quick else DEFAULT_MIN_RUN_TIME)
    formats = selected_formats(args, memory_formats)
    if device == "cuda":
        thread_counts = args.threads or [torch.get_num_threads()]
    else:
        thread_counts = args.threads or list(threads)
    peak_gbps = args.peak_gbps or (DEFAULT_CUDA_PEAK_GBPS if device == "cuda" else None)
    dev_name = device_name(device)
    sha = git_sha()
    out_path = args.out or RESULTS_DIR / f"{op}_{device_slug(dev_name)}.csv"

    isa = f" | CPU kernels at {hrnas_kernels.cpu_isa()}" if device == "cpu" else ""
    allocator = (
        "allocator defaults (--system-malloc)" if args.system_malloc else keep_freed_memory()
    )
    print(
        f"{op} | {dev_name} ({device}) | torch {torch.__version__} | git {sha}{isa} | {allocator}\n"
        f"loadavg at start: {loadavg()} | min_run_time {min_run_time:g} s | modes "
        f"{' '.join(args.modes)}\n"
        f"cells: p50 ms, speedup vs {baseline} (its p50 / this p50), GB/s of compulsory bytes "
        f"where the script counts them; p20/p80 and peak memory in {out_path}\n",
        flush=True,
    )
    errors = 0
    prev_threads = torch.get_num_threads()
    csv_file, writer = _open_csv(out_path)
    try:
        for n_threads in thread_counts:
            torch.set_num_threads(n_threads)
            for dtype_name in args.dtype:
                for fmt in formats:
                    cells, notes, block_errors = _measure_block(
                        cases,
                        labels,
                        providers,
                        args.modes,
                        setup,
                        device,
                        getattr(torch, dtype_name),
                        fmt,
                        n_threads,
                        min_run_time,
                        interleave,
                    )
                    errors += block_errors
                    common = {
                        "op": op,
                        "dtype": dtype_name,
                        "memory_format": fmt,
                        "threads": n_threads,
                        "device": dev_name,
                        "torch_version": torch.__version__,
                        "git_sha": sha,
                    }
                    writer.writerows(_rows(cells, baseline, peak_gbps, common))
                    csv_file.flush()
                    title = f"{dtype_name}, {fmt}, {n_threads} thread{'s' * (n_threads != 1)}"
                    _print_block(title, labels, args.modes, providers, baseline, cells, notes)
    finally:
        csv_file.close()
        torch.set_num_threads(prev_threads)
    print(f"loadavg at end: {loadavg()} | rows appended to {out_path}", flush=True)
    return 1 if errors else 0


def env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() not in ("0", "", "false", "no")


def run_pytest_benchmark(benchmark, prepared: Prepared, device: str, quick: bool) -> None:
    """Time ``prepared`` with the pytest-benchmark fixture.

    Quick runs use a fixed ``QUICK_PYTEST_ROUNDS`` rounds (no calibration) so the suite stays a
    smoke test; otherwise pytest-benchmark calibrates as configured on its command line. CUDA
    calls are synchronized, since the fixture reads a host clock.
    """
    fn = _with_grad_reset(prepared.fn, prepared.grad_to_none)
    if device == "cuda":
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()

    if prepared.nbytes:
        benchmark.extra_info["nbytes"] = prepared.nbytes
    with prepared.context():
        fn()
        if quick:
            benchmark.pedantic(fn, rounds=QUICK_PYTEST_ROUNDS, iterations=1, warmup_rounds=1)
        else:
            benchmark(fn)


# ---------------------------------------------------------------------------------------------
# Pieces every op's benchmark script shares.


def provider_unavailable(provider: str, device: str) -> str | None:
    """Why a provider cannot run on ``device`` here (None if it can). The eager providers always
    can; Triton is only timed on CUDA (interpreter timings mean nothing)."""
    import hrnas_kernels

    if provider in ("eager", "eager+compile"):
        return None
    if provider == "triton" and device != "cuda":
        return "Triton is benchmarked on CUDA only (TRITON_INTERPRET timings mean nothing)"
    reasons = hrnas_kernels.available_impls()[provider]
    return reasons[device] if device in reasons else f"no {device} device here"


class CompileCache:
    """torch.compile of a reference function, kept for one case at a time. ``dynamo.reset``
    between cases: dynamo does not guard on the thread count inductor's CPU code is built for."""

    def __init__(self):
        self._key, self._fns = None, {}

    def get(self, key: tuple, fn, fullgraph: bool = True):
        if self._key != key:
            torch._dynamo.reset()
            self._key, self._fns = key, {}
        if fn not in self._fns:
            self._fns[fn] = torch.compile(fn, fullgraph=fullgraph, dynamic=False)
        return self._fns[fn]


def no_donated_buffers():
    """Context for replaying a compiled backward: donated buffers forbid retain_graph."""
    return torch._functorch.config.patch(donated_buffer=False)


def run_pytest_case(benchmark, bench, case, memory_format, provider, mode, device, threads, quick):
    """One pytest-benchmark measurement of ``bench`` (an op's benchmark module)."""
    import pytest

    prepared = bench.setup(case, provider, mode, device, bench.DTYPE, MEMORY_FORMATS[memory_format])
    if isinstance(prepared, str):
        pytest.skip(f"{provider}: {prepared}")
    benchmark.group = f"{bench.OP} {bench.label(case)} {memory_format} {mode}"
    benchmark.extra_info.update(
        op=bench.OP,
        provider=provider,
        mode=mode,
        shape=bench.label(case),
        dtype=str(bench.DTYPE).removeprefix("torch."),
        memory_format=memory_format,
        threads=threads,
        device=device_name(device),
    )
    run_pytest_benchmark(benchmark, prepared, device, quick)
