"""Kernel tests run with poisoned launcher allocations (NaN-filled `empty`), every test."""
import warnings

import pytest

from reca.kernels import utils as kutils


@pytest.fixture(autouse=True)
def _poison_allocations():
    with kutils.poisoned_allocations(), warnings.catch_warnings():
        # The interpreter evaluates sigmoid(x) = 1 / (1 + exp(-x)) in numpy: exp overflows to
        # inf for very negative x and the result is the correct 0; numpy warns, a GPU does not.
        warnings.filterwarnings("ignore", "overflow encountered in exp", RuntimeWarning)
        yield
