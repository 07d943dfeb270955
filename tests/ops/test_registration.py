"""How the package registers its ops and what happens when parts of it are missing."""

import subprocess
import sys
import textwrap

import pytest
import torch

import hrnas_kernels
from hrnas_kernels._impl import IMPLS

OPS = ["multires_fusion_fwd", "multires_fusion_bwd"]


@pytest.mark.parametrize("name", OPS)
def test_native_and_triton_families_share_one_schema(name):
    native = getattr(torch.ops.hrnas_kernels, name).default._schema
    triton = getattr(torch.ops.hrnas_kernels, name + "_triton").default._schema
    assert str(native).replace(name, "X") == str(triton).replace(name + "_triton", "X")


def test_available_impls_reports_every_impl_with_reasons():
    table = hrnas_kernels.available_impls()
    assert set(table) == set(IMPLS)
    assert table["reference"]["cpu"] is None
    for impl, per_device in table.items():
        for device, reason in per_device.items():
            assert reason is None or (isinstance(reason, str) and reason)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


def test_import_and_reference_without_triton():
    """A machine without triton imports the package; impl='triton' says why it cannot run."""
    proc = _run(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import importlib.util
        _find = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "triton" else _find(name, *a)
        import torch, hrnas_kernels
        x = [torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2)]
        assert hrnas_kernels.multires_fusion(x, impl="reference").shape == (1, 2, 4, 4)
        assert "triton is not installed" in hrnas_kernels.available_impls()["triton"]["cpu"]
        try:
            hrnas_kernels.multires_fusion(x, impl="triton")
        except RuntimeError as e:
            assert "triton is not installed" in str(e), e
        else:
            raise AssertionError("impl='triton' ran without triton")
        print("ok")
        """
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_import_and_reference_without_the_extension():
    """Without hrnas_kernels._C: schemas still exist, reference works, native raises clearly."""
    proc = _run(
        """
        import sys
        sys.modules["hrnas_kernels._C"] = None  # the extension is missing
        import torch, hrnas_kernels
        assert hasattr(torch.ops.hrnas_kernels, "multires_fusion_fwd")
        x = [torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2)]
        assert hrnas_kernels.multires_fusion(x, impl="reference").shape == (1, 2, 4, 4)
        reason = hrnas_kernels.available_impls()["native"]["cpu"]
        assert "hrnas_kernels._C is not available" in reason, reason
        for impl in ("native", "auto"):
            try:
                hrnas_kernels.multires_fusion(x, impl=impl)
            except RuntimeError as e:
                assert "hrnas_kernels._C is not available" in str(e), e
            else:
                raise AssertionError(f"impl={impl!r} ran without the extension")
        print("ok")
        """
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_extension_loaded_here():
    """The test environment builds the extension: a silent failure to load it would turn every
    native test into a skip, so say it loudly."""
    reason = hrnas_kernels.available_impls()["native"]["cpu"]
    assert reason is None, reason
