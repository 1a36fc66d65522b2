"""The devices a Triton-kernel test runs on, each skipped with its real reason.

- ``cpu``: the kernels run on CPU tensors only through Triton's interpreter (``TRITON_INTERPRET=1``,
  set before any kernel is defined: conftest sets it unless the environment says otherwise);
- ``cuda``: the compiled kernels; under the interpreter a CUDA case would test the interpreter
  again, not the code the GPU runs, so it skips there (``benchmarks/gpu_run.sh`` sets
  ``TRITON_INTERPRET=0``).
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.cuda.is_available()


def cuda_compiled():
    """The ``cuda`` param: compiled Triton kernels on a GPU."""
    reason = (
        "no CUDA GPU"
        if not CUDA
        else "TRITON_INTERPRET=1: the CUDA cases check the compiled kernels (run with TRITON_INTERPRET=0)"
    )
    return pytest.param("cuda", marks=pytest.mark.skipif(not CUDA or INTERPRET, reason=reason))


def triton_devices() -> list:
    """``["cpu", "cuda"]`` as pytest params for a test of the Triton kernels themselves."""
    cpu = pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not INTERPRET, reason="Triton kernels run on CPU tensors only under TRITON_INTERPRET=1"
        ),
    )
    return [cpu, cuda_compiled()]


# a CPU-only test that runs Triton kernels (through the interpreter)
needs_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1"
)
