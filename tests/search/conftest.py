"""The search tests share the NAS tests' one-thread fixture (small shapes on a shared machine)."""

from tests.nas.conftest import _one_thread  # noqa: F401  (an autouse fixture)
