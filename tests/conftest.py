"""Shared test setup: the repository root on the import path, and one torch thread.

The models in the tests are tiny; with them, handing work between threads costs more than it saves,
and on a busy machine two threads can stall each other. Subprocess tests (torchrun, signals) set
their own thread count.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
