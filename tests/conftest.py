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


# The integration tier (`make test` runs it after the unit tier): whole programs in subprocesses
# (the CLI, torchrun, wheel builds, signals), torch.compile, and ptxas on every kernel. A module
# listed here is integration as a whole; a test whose name says "compile" is, wherever it lives.
INTEGRATION_MODULES = {
    "test_package.py", "test_cli.py", "test_bench.py", "test_compile_sm90.py", "test_benchmarks_smoke.py",
    "test_promises.py", "test_distributed.py", "test_fsdp.py", "test_sample_cli.py", "test_data_signals.py",
    "test_torchrun_refusals.py", "test_torchrun_resume.py", "test_dcp_integrity.py",
    "test_adapter_cli.py", "test_init_from_shards.py",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")
    config.addinivalue_line("markers", "integration: subprocesses, compile, wheels (make test's second tier)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in INTEGRATION_MODULES or "compile" in item.name:
            item.add_marker(pytest.mark.integration)
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
