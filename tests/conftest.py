"""Test configuration shared by every test module.

The Triton interpreter must be switched on before any ``@triton.jit`` kernel is *defined*,
so this runs before ``pipepack.kernels`` is imported by a test module.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=["torch", "triton"])
def impl(request: pytest.FixtureRequest) -> str:
    """Runs a kernel test once on the pure-torch path and once on the Triton path.

    On a machine without CUDA the Triton path runs on CPU tensors under the interpreter.
    """
    return request.param


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"
