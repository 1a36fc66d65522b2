"""Triton patch sampler vs the torch twin (TRITON_INTERPRET=1 on CPU; the same suite on CUDA).

Fresh random inputs each run (seed in the failure message), outputs poisoned with NaN first,
coordinates outside the image / on borders / fractional, L = 36 and 196, token counts that are not
multiples of the kernel's block. Grids stay small: the interpreter costs ~20-30 ms per program here.
"""

from __future__ import annotations

import pytest
import torch

from lafs_fast.kernels.patch_sampling import sample_patches_torch
from lafs_fast.kernels.patch_sampling_triton import patch_sample_forward, sample_patches_triton
from lafs_fast.sampling import sample_patches
from tests.devices import needs_interpreter, triton_devices

DEVICES = triton_devices()
H = 112
K = 196


def _tol(device: str) -> float:
    # The kernel mirrors the CPU grid_sample's rounding (max error ~1e-7 on CPU); on CUDA it is
    # compared with the CPU twin too (CUDA's grid_sample rounds differently, and the bilinear
    # derivative jumps where a sample lands on a pixel centre), with a margin for GPU arithmetic.
    return 1e-5 if device == "cpu" else 2e-5


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.cpu()


def _coords(b: int, k: int, gen: torch.Generator, device: str) -> torch.Tensor:
    """(b, k, 2) px: fractional inside, far outside, on the borders and exact pixel centres."""
    c = torch.rand(b, k, 2, generator=gen) * (H + 24) - 12  # -12 .. 124: inside and outside
    special = torch.tensor(
        [0.0, 111.0, -0.5, 111.5, 112.0, -4.0, 115.5, 56.0, 3.5, 108.0, -30.0, 200.0, 0.25, 110.75],
    )
    n = special.numel()
    c[:, :n, 0] = special
    c[:, :n, 1] = special.flip(0)
    c[:, n : 2 * n, 0] = special.roll(3)
    c[:, n : 2 * n, 1] = torch.rand(n, generator=gen) * H
    return c.to(device)


def _images(b: int, kind: str, gen: torch.Generator, device: str) -> torch.Tensor:
    if kind == "uint8":
        return torch.randint(0, 256, (b, H, H, 3), generator=gen, dtype=torch.uint8).to(device)
    x = (torch.rand(b, 3, H, H, generator=gen) * 2 - 1).to(device)
    if kind == "float_channels_last":  # non-contiguous NCHW view: exercises the stride path
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["uint8", "float", "float_channels_last"])
@pytest.mark.parametrize("b,n_l", [(2, 196), (3, 36), (1, 196)])
def test_forward_matches_twin_fp32_nan_poisoned(device, kind, b, n_l, gen):
    # 2 * 196, 3 * 36 and 1 * 196 tokens all leave a partial last block (32 tokens per program on CPU, 8 on CUDA)
    images = _images(b, kind, gen, device)
    coords = _coords(b, K, gen, device)
    indices = torch.randint(0, K, (b, n_l), generator=gen).to(device) if n_l != K else None
    noise = (torch.randn(b, n_l, 2, generator=gen) * 5).to(device)
    out = torch.full((b, n_l, 192), float("nan"), device=device)
    tokens, _, _ = patch_sample_forward(images, coords, 8, indices, noise, torch.float32, None, 0.0, 0, out=out)
    assert tokens.data_ptr() == out.data_ptr()
    assert torch.isfinite(tokens).all(), f"unwritten elements (seed {gen.initial_seed()})"
    ref = sample_patches_torch(images.cpu(), coords.cpu(), 8, indices=_cpu(indices), noise=noise.cpu())
    torch.testing.assert_close(tokens.cpu(), ref, atol=_tol(device), rtol=1e-5, msg=f"seed {gen.initial_seed()}")
    # Tokens near/outside the border really read zeros: a landmark at (-30, 200) gives all zeros.
    far = sample_patches_torch(images, torch.tensor([[[-30.0, 200.0]]], device=device).expand(b, 1, 2).contiguous())
    assert far.abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_forward_low_precision_outputs(device, out_dtype, gen):
    b, n_l = 3, 36
    images = _images(b, "uint8", gen, device)
    coords = _coords(b, K, gen, device)
    indices = torch.randint(0, K, (b, n_l), generator=gen).to(device)
    out = torch.full((b, n_l, 192), float("nan"), dtype=out_dtype, device=device)
    tokens, _, _ = patch_sample_forward(images, coords, 8, indices, None, out_dtype, None, 0.0, 0, out=out)
    assert tokens.dtype == out_dtype and torch.isfinite(tokens.float()).all()
    ref = sample_patches_torch(images.cpu(), coords.cpu(), 8, indices=indices.cpu()).to(device)
    # Relative 1e-2 (bf16 has 8 mantissa bits); small values get an absolute floor.
    torch.testing.assert_close(tokens.float(), ref, rtol=1e-2, atol=1e-2, msg=f"seed {gen.initial_seed()}")
    # and it is the correctly rounded value, not merely close
    torch.testing.assert_close(tokens, ref.to(out_dtype), rtol=1e-2, atol=1e-2)


@needs_interpreter
def test_bf16_image_input_against_fp32_twin(gen):
    images = _images(2, "float", gen, "cpu")
    coords = _coords(2, 36, gen, "cpu")
    tokens = sample_patches_triton(images.to(torch.bfloat16), coords, out_dtype=torch.float32)
    ref = sample_patches_torch(images.to(torch.bfloat16).float(), coords)
    torch.testing.assert_close(tokens, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_coordinate_gradient_matches_autograd_through_twin(device, kind, gen):
    b, n_l = 2, 36
    images = _images(b, kind, gen, device)
    coords = _coords(b, K, gen, device)
    # Indices with duplicates: a landmark drawn twice must receive both contributions.
    indices = torch.randint(0, K, (b, n_l), generator=gen).to(device)
    indices[:, 1] = indices[:, 0]
    noise0 = (torch.randn(b, n_l, 2, generator=gen) * 5).to(device)
    g = torch.randn(b, n_l, 192, generator=gen).to(device)

    c_k = coords.clone().requires_grad_()
    n_k = noise0.clone().requires_grad_()
    tok = sample_patches_triton(images, c_k, indices=indices, noise=n_k)
    (tok * g).sum().backward()

    c_t = coords.cpu().requires_grad_()
    n_t = noise0.cpu().requires_grad_()
    ref = sample_patches_torch(images.cpu(), c_t, indices=indices.cpu(), noise=n_t)  # CPU oracle
    (ref * g.cpu()).sum().backward()

    assert c_t.grad.abs().max() > 0  # the comparison is not vacuous
    torch.testing.assert_close(c_k.grad.cpu(), c_t.grad, atol=1e-4, rtol=1e-4, msg=f"seed {gen.initial_seed()}")
    torch.testing.assert_close(n_k.grad.cpu(), n_t.grad, atol=1e-4, rtol=1e-4)
    untouched = torch.ones(b, K, dtype=torch.bool, device=device)
    untouched.scatter_(1, indices, False)
    assert (c_k.grad[untouched] == 0).all()  # landmarks never drawn get no gradient


@needs_interpreter
def test_gradient_all_landmarks_and_drawn_noise(gen):
    """Dense view (no indices) with in-kernel noise: gradient vs the twin replaying the draws."""
    b = 1
    images = _images(b, "uint8", gen, "cpu")
    coords = _coords(b, K, gen, "cpu")
    g = torch.randn(b, K, 192, generator=gen)
    c_k = coords.clone().requires_grad_()
    tok, idx, noise = sample_patches_triton(images, c_k, sigma=5.0, seed=11, return_draws=True)
    assert idx is None and noise.shape == (b, K, 2)
    (tok * g).sum().backward()
    c_t = coords.clone().requires_grad_()
    ref = sample_patches_torch(images, c_t, noise=noise)
    (ref * g).sum().backward()
    torch.testing.assert_close(tok, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_k.grad, c_t.grad, atol=1e-4, rtol=1e-4)


@needs_interpreter
def test_in_kernel_draws_replay_seed_and_statistics(gen):
    b, n_l = 3, 36
    images = _images(b, "uint8", gen, "cpu")
    coords = _coords(b, K, gen, "cpu")
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    tok1, idx1, nz1 = sample_patches_triton(images, coords, num_tokens=n_l, sigma=5.0, seed=seed, return_draws=True)
    tok2, idx2, nz2 = sample_patches_triton(images, coords, num_tokens=n_l, sigma=5.0, seed=seed, return_draws=True)
    _, idx3, nz3 = sample_patches_triton(images, coords, num_tokens=n_l, sigma=5.0, seed=seed + 1, return_draws=True)
    assert idx1.shape == (b, n_l) and idx1.dtype == torch.int64 and nz1.shape == (b, n_l, 2)
    assert torch.equal(idx1, idx2) and torch.equal(nz1, nz2) and torch.equal(tok1, tok2)
    assert not torch.equal(idx1, idx3) and not torch.equal(nz1, nz3)
    assert int(idx1.min()) >= 0 and int(idx1.max()) < K
    # the drawn tokens are exactly the twin's tokens for those draws
    ref = sample_patches_torch(images, coords, indices=idx1, noise=nz1)
    torch.testing.assert_close(tok1, ref, atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_draw_distributions():
    """Index draw ~ U{0..K-1}, noise ~ N(0, sigma^2): loose statistical bounds (fixed seed, 1 draw).
    Patch size 2 keeps the interpreter cheap; the draws do not depend on P."""
    b, n_l, k = 64, 36, 196  # 2304 tokens
    images = torch.zeros(1, 3, 16, 16).expand(b, 3, 16, 16)
    coords = torch.zeros(b, k, 2)
    _, idx, nz = sample_patches_triton(images, coords, 2, num_tokens=n_l, sigma=5.0, seed=1234, return_draws=True)
    _, idx8, nz8 = sample_patches_triton(
        images[:2], coords[:2], 8, num_tokens=n_l, sigma=5.0, seed=1234, return_draws=True
    )
    assert torch.equal(idx8, idx[:2]) and torch.equal(nz8, nz[:2])  # same counters, same draws
    counts = torch.bincount(idx.flatten(), minlength=k).float()
    expected = idx.numel() / k
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 300, chi2  # dof 195: mean 195, sd ~20
    assert abs(float(nz.mean())) < 0.3
    assert abs(float(nz.std()) - 5.0) < 0.3
    # x and y noise uncorrelated
    assert abs(float(torch.corrcoef(nz.reshape(-1, 2).T)[0, 1])) < 0.08


@needs_interpreter
def test_offset_selects_independent_streams():
    images = torch.zeros(1, 3, 16, 16).expand(4, 3, 16, 16)
    coords = torch.zeros(4, 196, 2)

    def draw(seed: int, offset: int, backend: str):
        _, i, n = sample_patches(
            images, coords, 2, num_tokens=8, sigma=1.0, seed=seed, offset=offset, backend=backend, return_draws=True
        )
        return i, n

    for backend in ("triton", "torch"):
        a, b, c = draw(3, 0, backend), draw(3, 0, backend), draw(3, 2**40 + 5, backend)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    with pytest.raises(ValueError, match="offset"):
        sample_patches_triton(images, coords, 2, sigma=1.0, seed=1, offset=-1)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sample_patches_triton(torch.zeros(1, 3, 16, 16), torch.zeros(1, 4, 2))


@needs_interpreter
def test_public_dispatch_triton_on_cpu_and_torch_draws(gen):
    b = 2
    images = _images(b, "uint8", gen, "cpu")
    coords = _coords(b, K, gen, "cpu")
    # explicit draws through both backends agree
    idx = torch.randint(0, K, (b, 36), generator=gen)
    nz = torch.randn(b, 36, 2, generator=gen)
    a = sample_patches(images, coords, indices=idx, noise=nz, backend="triton", out_dtype=torch.bfloat16)
    t = sample_patches(images, coords, indices=idx, noise=nz, backend="torch", out_dtype=torch.bfloat16)
    assert a.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), t.float(), rtol=1e-2, atol=1e-2)
    # in-sampler draws: each backend reproduces its own draws from a seed and returns them
    for backend in ("triton", "torch"):
        t1, i1, n1 = sample_patches(
            images, coords, num_tokens=36, sigma=5.0, seed=7, backend=backend, return_draws=True
        )
        t2, i2, n2 = sample_patches(
            images, coords, num_tokens=36, sigma=5.0, seed=7, backend=backend, return_draws=True
        )
        assert torch.equal(i1, i2) and torch.equal(n1, n2) and torch.equal(t1, t2)
        replay = sample_patches(images, coords, indices=i1, noise=n1, backend="torch")
        torch.testing.assert_close(t1, replay, atol=1e-5, rtol=1e-5)
    # auto on CPU is the twin
    auto = sample_patches(images, coords, indices=idx, noise=nz)
    torch.testing.assert_close(auto, sample_patches_torch(images, coords, indices=idx, noise=nz))


@needs_interpreter
def test_option_errors():
    images = torch.zeros(1, 3, 16, 16)
    coords = torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match="either indices or num_tokens"):
        sample_patches(images, coords, indices=torch.zeros(1, 2, dtype=torch.long), num_tokens=2)
    with pytest.raises(ValueError, match="either noise or sigma"):
        sample_patches(images, coords, noise=torch.zeros(1, 4, 2), sigma=1.0)
    with pytest.raises(ValueError, match="noise must be"):
        sample_patches(images, coords, noise=torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="out_dtype"):
        sample_patches_triton(images, coords, out_dtype=torch.int32)


@needs_interpreter
def test_empty_and_single_token(gen):
    images = _images(1, "uint8", gen, "cpu")
    coords = torch.tensor([[[55.3, 60.7]]])
    out = sample_patches_triton(images, coords)
    torch.testing.assert_close(out, sample_patches_torch(images, coords), atol=1e-5, rtol=1e-5)
    empty = sample_patches_triton(images, coords, indices=torch.zeros(1, 0, dtype=torch.long))
    assert empty.shape == (1, 0, 192)


def _has_nvidia_backend() -> bool:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("triton")
    return spec is not None and (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton's NVIDIA backend (ptxas) not installed")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter checks the maths, not code generation: lower one variant of every code path
    (patch forward with in-kernel / given draws, backward, view kernel, blur) to an sm_90 cubin
    (bundled LLVM + ptxas, no driver) and require no register spills beyond Philox's small frame
    and no approximate fp32 division in the PTX (``div.full.f32``, what a plain ``/`` lowers to).
    The full variant list: ``env -u TRITON_INTERPRET python -m lafs_fast.kernels.aot_check all``."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-m", "lafs_fast.kernels.aot_check", "quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("ok")]
    assert len(lines) == 5, res.stdout
    for ln in lines:
        stack = 0 if "stack=None" in ln else int(ln.split("stack=", 1)[1].split()[0])
        assert stack <= 64, ln
        assert "approx_div=0" in ln, ln


def _specialization_key(kernel, args: tuple, kwargs: dict) -> list:
    """The key Triton's launcher compiles (and caches) a variant under for these launch arguments:
    its binder (``create_function_from_signature``) for the kernel's own ``do_not_specialize``. The
    interpreter keeps no compile cache, so the key is computed, not observed."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    dns = getattr(kernel, "do_not_specialize", None) or getattr(kernel, "kwargs", {}).get("do_not_specialize")
    jit = JITFunction(kernel.fn, do_not_specialize=dns)
    return create_function_from_signature(jit.signature, jit.params, BaseBackend)(*args, **kwargs)[1]


def test_one_compiled_variant_for_every_seed_and_offset(monkeypatch):
    """Triton specialises integer arguments by value (== 1, divisible by 16, i32 / i64): a Philox
    seed or offset passed plainly would compile new variants mid-run (the views draw a new seed every
    step). The forward's launch key must not depend on them, drawn or not."""
    import lafs_fast.kernels.patch_sampling_triton as P

    launches: list[tuple[tuple, dict]] = []
    kernel = P._patch_fwd_kernel

    class Record:
        def __getitem__(self, grid):
            return lambda *a, **k: launches.append((a, k))

    monkeypatch.setattr(P, "_patch_fwd_kernel", Record())
    images = torch.zeros(2, H, H, 3, dtype=torch.uint8)
    coords = torch.zeros(2, K, 2)
    keys = {}
    for draw in (True, False):
        for seed, offset in [(1, 0), (16, 1), (17, 16), (2**31 + 5, 2**31), (2**40, 3 * 2**40 + 1), (2**62 + 7, 2**61)]:
            launches.clear()
            patch_sample_forward(
                images,
                coords,
                8,
                None,
                None,
                torch.bfloat16,
                36 if draw else None,
                5.0 if draw else 0.0,
                seed,
                offset=offset,
            )
            ((args, kwargs),) = launches
            kwargs = {k: v for k, v in kwargs.items() if k != "num_warps"}
            keys.setdefault(draw, set()).add(repr(_specialization_key(kernel, args, kwargs)))
    assert len(keys[True]) == 1 and len(keys[False]) == 1, keys


def test_an_explicit_triton_interpret_0_is_respected_and_skips_name_why(tmp_path):
    """``TRITON_INTERPRET=0`` (what the GPU runner sets) reaches the kernels: conftest does not turn
    the interpreter back on, and a CPU-interpreter case skips naming the reason instead of failing."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(root)}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            f"{root}/tests/test_kernels_patch.py",
            "-k",
            "draw_distributions or forward_matches_twin_fp32",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-2000:]
    assert "needs TRITON_INTERPRET=1" in out and "only under TRITON_INTERPRET=1" in out, out[-1500:]
    assert " passed" not in out and " failed" not in out and " skipped" in out, out[-1500:]
