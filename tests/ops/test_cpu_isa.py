"""The copies of the CPU kernels per instruction-set level (csrc/common/cpu_isa.h).

The extension registers the copy of the highest level the machine supports, so the rest of the
suite tests that one only. Each lower level this machine can run is tested here: the native CPU
kernel tests run again in a subprocess with ``HRNAS_CPU_ISA`` set to it (its vectors are narrower,
so its tails, windows and channel blocks fall at other sizes).
"""

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import hrnas_kernels
from hrnas_kernels._impl import CPU_ISAS

pytestmark = pytest.mark.skipif(
    hrnas_kernels.cpu_isa() is None, reason="the C++ extension is not built"
)
ROOT = Path(__file__).resolve().parents[2]
KERNEL_TESTS = [
    "tests/ops/test_mixed_dwconv_bn_act.py",
    "tests/ops/test_multires_fusion.py",
    "tests/ops/test_token_transformer.py",
    "tests/ops/test_output_pool.py",
]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _python(code: str, isa: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("HRNAS_CPU_ISA", None)
    if isa is not None:
        env["HRNAS_CPU_ISA"] = isa
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )


def test_selected_level_is_the_machines_best():
    """Without the variable, the level follows the CPU's flags (x86-64 Linux, GCC build)."""
    isa = hrnas_kernels.cpu_isa()
    assert isa in CPU_ISAS
    flags = _cpu_flags()
    if platform.machine() != "x86_64" or not flags:
        pytest.skip("level detection is checked against /proc/cpuinfo on x86-64 only")
    # The x86-64 psABI levels, in /proc/cpuinfo's names (abm: lzcnt, pni: sse3).
    v2 = {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"}
    v3 = v2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
    v4 = v3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    avx512, avx2 = v4 <= flags, v3 <= flags
    if os.environ.get("HRNAS_CPU_ISA"):
        pytest.skip("HRNAS_CPU_ISA is set in this environment")
    assert isa == ("avx512" if avx512 else "avx2" if avx2 else "base")


def test_variable_selects_a_lower_level_and_warns_on_bad_names():
    proc = _python("import hrnas_kernels as k; print(k.cpu_isa())", "base")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["base"] and "HRNAS_CPU_ISA" not in proc.stderr
    proc = _python("import hrnas_kernels as k; print(k.cpu_isa())", "sse9")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [hrnas_kernels.cpu_isa()]
    assert "HRNAS_CPU_ISA='sse9' is not one of" in proc.stderr


def test_only_per_level_code_uses_wide_registers():
    """The copies share by name the library templates they instantiate (std::vector's resize,
    say), each compiled for its copy's level; the linker keeps one, and it must be the baseline's
    (objects link in path order: <op>_cpu.o first) or a machine without the level faults in it.
    So in the built library only our per-level code (anonymous namespaces, the simd level
    namespaces) may touch ymm/zmm registers."""
    objdump = shutil.which("objdump")
    if objdump is None or platform.machine() != "x86_64":
        pytest.skip("needs objdump on x86-64")
    from hrnas_kernels import _C

    listing = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", "-C", _C.__file__],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    allowed = ("(anonymous namespace)", "::avx2::", "::avx512::")
    name, offenders, functions = None, set(), 0
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            name, functions = header.group(1), functions + 1
        elif name and ("%ymm" in line or "%zmm" in line) and not any(a in name for a in allowed):
            offenders.add(name)
    assert functions > 100, "objdump listed too few functions"
    assert not offenders, sorted(offenders)[:20]


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_kernels_at_each_lower_level(isa):
    best = hrnas_kernels.cpu_isa()
    if os.environ.get("HRNAS_CPU_ISA"):
        pytest.skip("HRNAS_CPU_ISA is set: this run already tests one chosen level")
    if CPU_ISAS.index(isa) >= CPU_ISAS.index(best):
        pytest.skip(f"{isa} is this run's own level or above it ({best}): the suite tests it")
    env = dict(os.environ, HRNAS_CPU_ISA=isa)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "native"]
    proc = subprocess.run(
        cmd + KERNEL_TESTS, cwd=ROOT, capture_output=True, text=True, env=env, timeout=1500
    )
    tail = "\n".join(proc.stdout.splitlines()[-15:])
    assert proc.returncode == 0, f"the native kernel tests at HRNAS_CPU_ISA={isa}:\n{tail}"
    assert " passed" in tail, tail
