"""Shared test setup: the repository root on the import path, and one torch thread for the whole run.

The models in the tests are tiny; with them, handing work between threads costs more than it saves,
and on a busy machine two threads can stall each other. Subprocess tests (torchrun, signals) set
their own thread count.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    torch.set_num_threads(1)
