"""The NAS tests run small shapes: one thread each avoids oversubscribing a shared machine,
where two threads made them several times slower, without changing any result checked."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
