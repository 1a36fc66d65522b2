"""Test session setup. TRITON_INTERPRET must be set before any Triton kernel is defined.

An explicit ``TRITON_INTERPRET`` in the environment always wins (``benchmarks/gpu_run.sh`` sets 0 so
the CUDA cases run the compiled kernels). Unset, it becomes 1 (the interpreter) on a machine without
a GPU and 0 on one with a GPU; tests/devices.py skips each case that cannot run under the choice,
naming why.
"""

import os
import zlib

os.environ.setdefault("OMP_NUM_THREADS", "2")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402  (importing torch defines no Triton kernel)

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

from lafs_fast._torchvision_fix import ensure_torchvision  # noqa: E402

ensure_torchvision()  # tests import torchvision / timm themselves (CPU torch + PyPI's CUDA torchvision)

from tests import BLAZEFACE_DIR, SHARED  # noqa: E402

# the BlazeFace weights of ../shared (where they exist) are found like a user's --weights folder
os.environ.setdefault("LAFS_FAST_WEIGHTS", str(BLAZEFACE_DIR))


@pytest.fixture
def orl_dir() -> Path:
    """../shared/data/orl_faces (AT&T/ORL, 40 people x 10 grey 92x112 PGM); skip when absent."""
    path = SHARED / "data" / "orl_faces"
    if not path.is_dir():
        pytest.skip("../shared/data/orl_faces not present (a user's clone has no shared/)")
    return path


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A seeded CPU generator. By default the seed is a hash of the test's id: the same inputs on
    every run and machine, so a red CI is a real failure and reproduces. ``LAFS_TEST_FUZZ=1`` draws a
    fresh seed each run instead (new inputs every run: a tolerance search); the seed is printed
    either way and ``gen.initial_seed()`` reproduces it."""
    if os.environ.get("LAFS_TEST_FUZZ") == "1":
        seed = int.from_bytes(os.urandom(4), "little")
    else:
        seed = zlib.crc32(request.node.nodeid.encode())
    print(f"generator seed {seed}")  # shown by pytest for a failing test
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (modules opt in with ``pytestmark``): on a busy 2-core
    machine two OpenMP threads run the landmark CNN 5-10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
