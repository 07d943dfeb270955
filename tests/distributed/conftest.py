"""The distributed/checkpoint tests share the NAS tests' one-thread fixture."""

from tests.nas.conftest import _one_thread  # noqa: F401  (an autouse fixture)
