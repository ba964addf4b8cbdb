import os

import pytest
import torch

torch.set_num_threads(1)
# commands run in-process by the CLI tests keep one thread (the automatic policy has its
# own tests in tests/test_threads.py)
os.environ["METARL_THREADS"] = "1"


@pytest.fixture(autouse=True)
def _single_thread():
    torch.set_num_threads(1)
    yield
