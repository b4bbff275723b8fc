"""Test-wide setup.

Triton's interpreter must be chosen before `triton` is first imported, so it is decided here,
once, for the whole session: on a machine without CUDA the kernels run under
`TRITON_INTERPRET=1` (exact, slow: kernel tests use small odd shapes). Tests marked `gpu` run
only when CUDA is present.
"""
import os

import pytest


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
