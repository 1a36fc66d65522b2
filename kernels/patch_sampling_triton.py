"""Landmark patch sampling as one Triton kernel, with the coordinate gradient as a second.

Same numbers and token layout as the torch twin (``kernels/patch_sampling.py``, the oracle), fused
into one launch:

- index selection: given ``indices``, or drawn in-kernel uniformly WITH replacement from the K
  landmarks (the LAFS "shuffle"), or all K in order;
- perturbation: given ``noise``, or N(0, sigma^2) px drawn in-kernel (the LAFS "position shift");
- bilinear sampling with ``align_corners=False`` and zero padding, from uint8 NHWC (normalised
  ``x / 255 * 2 - 1`` on the fly) or float NCHW (any strides);
- output written once as (B, L, 3 * P * P) in bf16 / fp16 / fp32, element (a, b, c) of a token at
  ``(a * P + b) * 3 + c`` (a = x offset index).

Randomness: Philox (``tl.philox``), counter-based, keyed by ``seed``; the counter of a token is
(its flat index ``b * L + l``, ``offset`` as two 31-bit words, 0), so one seed gives independent
streams per ``offset`` (e.g. a step * views + view index). One 4x32-bit draw per token gives the
landmark index (word 0, modulo K) and the two noise values (words 1-2 through Box-Muller), so
(seed, offset) reproduces both, independently of the block size and of the device. The draws are
returned so that the twin can replay them.

Why per-element gathers rather than the 9x9-window trick: the window trick (one set of bilinear
weights per patch) is exact in real arithmetic, but the reference evaluates
``fma((x + o) / (H/2) - 1 + 1, W/2, -0.5)`` per element in fp32, whose rounding differs per offset
by up to ~1e-5 px (up to ~2e-5 in the output). Mirroring that expression per element keeps the
kernel within one float rounding of the CPU twin (max error ~1e-7) while the 4 gathers per output
hit L1. (CUDA's grid_sample unnormalises as ``((u + 1) * W - 1) / 2``: the CUDA twin and this
kernel may then differ by ~1e-5 in rare elements.)

Backward: d tokens / d coords only (no image gradient), a per-token reduction over its
3 * P * P values, then a scatter-add over the drawn indices (a landmark drawn twice receives both).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["sample_patches_triton", "patch_sample_forward", "OUT_DTYPES"]

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Tokens per program: a (BLOCK_T, BLOCK_E) tile; BLOCK_E covers 3 * P * P (192 -> 256 lanes).
# On CUDA, 2 tokens x 256 lanes over 4 warps = 4 elements per thread: 64 registers and no stack on
# sm_90 (8 tokens / 8 warps needed 160 registers: one block per SM); the kernel is gather- and
# store-bound, so occupancy matters more than work per program.
_BLOCK_T = 2
_NUM_WARPS = 4
# Under the interpreter (CPU tensors) each program costs ~20 ms of Python whatever its size, so
# fewer, larger programs; the masking logic is the same for every block size.
_BLOCK_T_INTERPRETER = 32


@triton.jit
def _token_points(
    coords_ptr,
    idx_ptr,
    noise_ptr,
    idx_out_ptr,
    noise_out_ptr,
    tok,
    tmask,
    L,
    K,
    s_cb,
    s_ck,
    s_cd,
    s_xb,
    s_xl,
    s_nb,
    s_nl,
    s_nd,
    seed,
    off_lo,
    off_hi,
    sigma,
    IDX_MODE: tl.constexpr,
    NOISE_MODE: tl.constexpr,
    WRITE_DRAWS: tl.constexpr,
):
    """Per-token sample centre (px, py) fp32 and batch index, for a (BLOCK_T,) vector of tokens.

    IDX_MODE: 0 = landmark l (all K in order), 1 = indices[b, l], 2 = drawn uniformly in [0, K).
    NOISE_MODE: 0 = none, 1 = noise[b, l, :], 2 = N(0, sigma^2) drawn.
    """
    b = tok // L
    l_ = tok - b * L
    if IDX_MODE == 2 or NOISE_MODE == 2:
        # Counter = (flat token index, offset): the draw does not depend on the launch geometry.
        zero = tok * 0
        r0, r1, r2, r3 = tl.philox(seed, tok, zero + off_lo, zero + off_hi, zero)
    if IDX_MODE == 0:
        k = l_
    elif IDX_MODE == 1:
        k = tl.load(idx_ptr + b * s_xb + l_ * s_xl, mask=tmask, other=0).to(tl.int32)
    else:
        # r0 is uint32: widen (zero-extend) before the modulo; K may be specialised to constexpr 1.
        k = (r0.to(tl.int64) % K).to(tl.int32)
        if WRITE_DRAWS:
            tl.store(idx_out_ptr + tok, k, mask=tmask)
    cx = tl.load(coords_ptr + b * s_cb + k * s_ck, mask=tmask, other=0.0).to(tl.float32)
    cy = tl.load(coords_ptr + b * s_cb + k * s_ck + s_cd, mask=tmask, other=0.0).to(tl.float32)
    if NOISE_MODE == 1:
        nb = noise_ptr + b * s_nb + l_ * s_nl
        cx = cx + tl.load(nb, mask=tmask, other=0.0).to(tl.float32)
        cy = cy + tl.load(nb + s_nd, mask=tmask, other=0.0).to(tl.float32)
    elif NOISE_MODE == 2:
        n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r1), tl.uint_to_uniform_float(r2))
        n0 = n0 * sigma
        n1 = n1 * sigma
        if WRITE_DRAWS:
            tl.store(noise_out_ptr + tok * 2, n0, mask=tmask)
            tl.store(noise_out_ptr + tok * 2 + 1, n1, mask=tmask)
        cx = cx + n0
        cy = cy + n1
    return b, cx, cy


@triton.jit
def _corners(
    img_ptr,
    b,
    cx,
    cy,
    e,
    emask,
    tmask,
    H,
    W,
    s_ib,
    s_iy,
    s_ix,
    s_ic,
    P: tl.constexpr,
    IS_U8: tl.constexpr,
):
    """The four bilinear corner values and fractional weights of every (token, element) pair.

    Element e = (a * P + bb) * 3 + c samples pixel-centre coordinate
    ``((x + o) / (H/2) - 1 + 1) * (W/2) - 0.5`` with o = a - P/2 (the reference's fp32 expression,
    then grid_sample's align_corners=False unnormalisation); the same for y with bb. Corners outside
    the image read 0 (in the normalised range, as grid_sample's zero padding).
    """
    a = e // (3 * P)
    bb = (e // 3) % P
    c = e % 3
    o = (a - P // 2).to(tl.float32)
    q = (bb - P // 2).to(tl.float32)
    half_h = H * 0.5
    u = tl.div_rn(cx[:, None] + o[None, :], half_h) - 1.0
    v = tl.div_rn(cy[:, None] + q[None, :], half_h) - 1.0
    # grid_sample (CPU) unnormalises as fma(u + 1, W/2, -0.5): one rounding. (u + 1) * (W/2) is
    # exact in fp64 (24 + 7 bits), so fp64 then one cast reproduces the fma on every backend (the
    # interpreter's fma rounds twice).
    ix = ((u + 1.0).to(tl.float64) * (W * 0.5) - 0.5).to(tl.float32)
    iy = ((v + 1.0).to(tl.float64) * (H * 0.5) - 0.5).to(tl.float32)
    fx = tl.floor(ix)
    fy = tl.floor(iy)
    w = ix - fx
    n = iy - fy
    x0 = fx.to(tl.int32)
    y0 = fy.to(tl.int32)
    x1 = x0 + 1
    y1 = y0 + 1
    m = tmask[:, None] & emask[None, :]
    vx0 = (x0 >= 0) & (x0 < W)
    vx1 = (x1 >= 0) & (x1 < W)
    vy0 = (y0 >= 0) & (y0 < H)
    vy1 = (y1 >= 0) & (y1 < H)
    base = img_ptr + b[:, None].to(tl.int64) * s_ib + c[None, :] * s_ic
    # Clamp addresses so masked-off lanes never form wild pointers.
    x0c = tl.minimum(tl.maximum(x0, 0), W - 1)
    x1c = tl.minimum(tl.maximum(x1, 0), W - 1)
    y0c = tl.minimum(tl.maximum(y0, 0), H - 1)
    y1c = tl.minimum(tl.maximum(y1, 0), H - 1)
    m00 = m & vy0 & vx0
    m01 = m & vy0 & vx1
    m10 = m & vy1 & vx0
    m11 = m & vy1 & vx1
    p00 = tl.load(base + y0c * s_iy + x0c * s_ix, mask=m00, other=0).to(tl.float32)
    p01 = tl.load(base + y0c * s_iy + x1c * s_ix, mask=m01, other=0).to(tl.float32)
    p10 = tl.load(base + y1c * s_iy + x0c * s_ix, mask=m10, other=0).to(tl.float32)
    p11 = tl.load(base + y1c * s_iy + x1c * s_ix, mask=m11, other=0).to(tl.float32)
    if IS_U8:
        # Normalise as the twin does (x / 255 * 2 - 1); padding stays 0 in the normalised range.
        p00 = tl.where(m00, tl.div_rn(p00, 255.0) * 2.0 - 1.0, 0.0)
        p01 = tl.where(m01, tl.div_rn(p01, 255.0) * 2.0 - 1.0, 0.0)
        p10 = tl.where(m10, tl.div_rn(p10, 255.0) * 2.0 - 1.0, 0.0)
        p11 = tl.where(m11, tl.div_rn(p11, 255.0) * 2.0 - 1.0, 0.0)
    return p00, p01, p10, p11, w, n


# The Philox key and counter words change every step: specialised by value (== 1, divisible by 16,
# i32 vs i64) they would compile new variants inside a timed run. Not specialised, and the key
# typed i64 whatever its value: one variant for every (seed, offset).
@triton.jit(do_not_specialize=["seed", "off_lo", "off_hi"])
def _patch_fwd_kernel(
    img_ptr,
    coords_ptr,
    idx_ptr,
    noise_ptr,
    out_ptr,
    idx_out_ptr,
    noise_out_ptr,
    n_tokens,
    L,
    K,
    H,
    W,
    s_ib,
    s_iy,
    s_ix,
    s_ic,
    s_cb,
    s_ck,
    s_cd,
    s_xb,
    s_xl,
    s_nb,
    s_nl,
    s_nd,
    seed: tl.int64,
    off_lo,
    off_hi,
    sigma,
    P: tl.constexpr,
    IS_U8: tl.constexpr,
    IDX_MODE: tl.constexpr,
    NOISE_MODE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """tokens[t, e] for BLOCK_T tokens t (flat b * L + l) and all E = 3 * P * P elements e."""
    pid = tl.program_id(0)
    tok = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < n_tokens
    b, cx, cy = _token_points(
        coords_ptr,
        idx_ptr,
        noise_ptr,
        idx_out_ptr,
        noise_out_ptr,
        tok,
        tmask,
        L,
        K,
        s_cb,
        s_ck,
        s_cd,
        s_xb,
        s_xl,
        s_nb,
        s_nl,
        s_nd,
        seed,
        off_lo,
        off_hi,
        sigma,
        IDX_MODE,
        NOISE_MODE,
        True,
    )
    E: tl.constexpr = 3 * P * P
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    p00, p01, p10, p11, w, n = _corners(img_ptr, b, cx, cy, e, emask, tmask, H, W, s_ib, s_iy, s_ix, s_ic, P, IS_U8)
    # Same association as grid_sample's CPU kernel: nw*s*e + ne*s*w + sw*n*e + se*n*w.
    ew = 1.0 - w
    sn = 1.0 - n
    val = p00 * (sn * ew) + p01 * (sn * w) + p10 * (n * ew) + p11 * (n * w)
    m = tmask[:, None] & emask[None, :]
    optr = out_ptr + tok[:, None].to(tl.int64) * E + e[None, :]
    tl.store(optr, val.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _patch_bwd_kernel(
    img_ptr,
    coords_ptr,
    idx_ptr,
    noise_ptr,
    gout_ptr,
    gpts_ptr,
    n_tokens,
    L,
    K,
    H,
    W,
    s_ib,
    s_iy,
    s_ix,
    s_ic,
    s_cb,
    s_ck,
    s_cd,
    s_xb,
    s_xl,
    s_nb,
    s_nl,
    s_nd,
    s_gt,
    s_ge,
    P: tl.constexpr,
    IS_U8: tl.constexpr,
    IDX_MODE: tl.constexpr,
    NOISE_MODE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """d loss / d (sample centre) per token: gpts[t, :] = sum_e gout[t, e] * d tokens[t, e] / d (x, y).

    IDX_MODE / NOISE_MODE are 0 or 1 here: the forward's draws are replayed from its outputs.
    """
    pid = tl.program_id(0)
    tok = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < n_tokens
    b, cx, cy = _token_points(
        coords_ptr,
        idx_ptr,
        noise_ptr,
        idx_ptr,
        noise_ptr,
        tok,
        tmask,
        L,
        K,
        s_cb,
        s_ck,
        s_cd,
        s_xb,
        s_xl,
        s_nb,
        s_nl,
        s_nd,
        0,
        0,
        0,
        0.0,
        IDX_MODE,
        NOISE_MODE,
        False,
    )
    E: tl.constexpr = 3 * P * P
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    p00, p01, p10, p11, w, n = _corners(img_ptr, b, cx, cy, e, emask, tmask, H, W, s_ib, s_iy, s_ix, s_ic, P, IS_U8)
    m = tmask[:, None] & emask[None, :]
    g = tl.load(gout_ptr + tok[:, None].to(tl.int64) * s_gt + e[None, :] * s_ge, mask=m, other=0.0).to(tl.float32)
    ew = 1.0 - w
    sn = 1.0 - n
    # grid_sample's bilinear derivative (d/d ix, d/d iy); d ix / d x = (W/2) / (H/2) = 1 here.
    dix = (p01 - p00) * sn + (p11 - p10) * n
    diy = (p10 - p00) * ew + (p11 - p01) * w
    gx = tl.sum(tl.where(m, dix * g, 0.0), axis=1) * tl.div_rn(W * 0.5, H * 0.5)
    gy = tl.sum(tl.where(m, diy * g, 0.0), axis=1)
    tl.store(gpts_ptr + tok * 2, gx, mask=tmask)
    tl.store(gpts_ptr + tok * 2 + 1, gy, mask=tmask)


def _image_strides(images: torch.Tensor) -> tuple[bool, int, int, int, int, int, int]:
    """(is_uint8, H, W, stride_b, stride_y, stride_x, stride_c) in logical (b, y, x, c) order."""
    if images.dtype == torch.uint8:  # (B, H, W, 3)
        sb, sy, sx, sc = images.stride()
        return True, images.shape[1], images.shape[2], sb, sy, sx, sc
    sb, sc, sy, sx = images.stride()  # (B, 3, H, W)
    return False, images.shape[2], images.shape[3], sb, sy, sx, sc


def _launch_meta(patch_size: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_E): tokens per program and lanes per token (3 * P * P rounded up to 2^k)."""
    block_t = _BLOCK_T if device.type == "cuda" else _BLOCK_T_INTERPRETER
    return block_t, triton.next_power_of_2(3 * patch_size * patch_size)


def _draw_modes(
    indices: torch.Tensor | None, num_tokens: int | None, noise: torch.Tensor | None, sigma: float, k: int
) -> tuple[int, int, int]:
    """(IDX_MODE, tokens per sample L, NOISE_MODE) of the forward kernel: indices given (1), drawn
    (2) or all K in order (0); noise given (1), drawn (2) or none (0)."""
    if indices is not None:
        idx_mode, n_l = 1, indices.shape[1]
    elif num_tokens is not None:
        idx_mode, n_l = 2, int(num_tokens)
    else:
        idx_mode, n_l = 0, k
    noise_mode = 1 if noise is not None else 2 if sigma > 0 else 0
    return idx_mode, n_l, noise_mode


def patch_sample_forward(
    images: torch.Tensor,
    coords: torch.Tensor,
    patch_size: int,
    indices: torch.Tensor | None,
    noise: torch.Tensor | None,
    out_dtype: torch.dtype,
    num_tokens: int | None,
    sigma: float,
    seed: int,
    out: torch.Tensor | None = None,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the forward kernel (no autograd).

    Args:
        images: (B, H, W, 3) uint8 or (B, 3, H, W) float.
        coords: (B, K, 2) fp32 px.
        indices: (B, L) int or None; with ``num_tokens`` set (and indices None) L = num_tokens
            indices are drawn.
        noise: (B, L, 2) float px or None; with ``sigma > 0`` (and noise None) it is drawn.
        out_dtype: fp32 / bf16 / fp16.
        seed: Philox key of the draws.
        offset: second Philox counter word (0 <= offset < 2**62): independent streams per seed.
        out: optional preallocated contiguous (B, L, 3 * P * P) ``out_dtype`` to write into
            (tests poison it with NaN to catch unwritten elements).

    Returns:
        tokens (B, L, 3 * P * P) ``out_dtype``; drawn indices (B, L) int64 or None; drawn noise
        (B, L, 2) fp32 or None.
    """
    is_u8, h, w, s_ib, s_iy, s_ix, s_ic = _image_strides(images)
    bsz, k = coords.shape[0], coords.shape[1]
    idx_mode, n_l, noise_mode = _draw_modes(indices, num_tokens, noise, sigma, k)
    dev = images.device
    e = 3 * patch_size * patch_size
    if out is None:
        out = torch.empty((bsz, n_l, e), dtype=out_dtype, device=dev)
    elif tuple(out.shape) != (bsz, n_l, e) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({bsz}, {n_l}, {e}) {out_dtype} tensor")
    idx_out = torch.empty((bsz, n_l), dtype=torch.int32, device=dev) if idx_mode == 2 else None
    noise_out = torch.empty((bsz, n_l, 2), dtype=torch.float32, device=dev) if noise_mode == 2 else None
    n_tokens = bsz * n_l
    if n_tokens == 0:
        return out, (idx_out.long() if idx_out is not None else None), noise_out
    dummy = coords  # any valid pointer for absent optional tensors (never dereferenced)
    idx_t = indices if indices is not None else dummy
    noise_t = noise if noise is not None else dummy
    s_xb, s_xl = indices.stride() if indices is not None else (0, 0)
    s_nb, s_nl, s_nd = noise.stride() if noise is not None else (0, 0, 0)
    block_t, block_e = _launch_meta(patch_size, images.device)
    grid = (triton.cdiv(n_tokens, block_t),)
    _patch_fwd_kernel[grid](
        images,
        coords,
        idx_t,
        noise_t,
        out,
        idx_out if idx_out is not None else dummy,
        noise_out if noise_out is not None else dummy,
        n_tokens,
        n_l,
        k,
        h,
        w,
        s_ib,
        s_iy,
        s_ix,
        s_ic,
        coords.stride(0),
        coords.stride(1),
        coords.stride(2),
        s_xb,
        s_xl,
        s_nb,
        s_nl,
        s_nd,
        int(seed),
        int(offset) & 0x7FFFFFFF,
        (int(offset) >> 31) & 0x7FFFFFFF,
        float(sigma),
        P=patch_size,
        IS_U8=is_u8,
        IDX_MODE=idx_mode,
        NOISE_MODE=noise_mode,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        num_warps=_NUM_WARPS,
    )
    return out, (idx_out.long() if idx_out is not None else None), noise_out


def _patch_sample_backward(
    images: torch.Tensor,
    coords: torch.Tensor,
    indices: torch.Tensor | None,
    noise: torch.Tensor | None,
    grad_tokens: torch.Tensor,
    patch_size: int,
) -> torch.Tensor:
    """Per-token gradient w.r.t. the sample centre: (B, L, 2) fp32."""
    is_u8, h, w, s_ib, s_iy, s_ix, s_ic = _image_strides(images)
    bsz, n_l, _ = grad_tokens.shape
    gpts = torch.empty((bsz, n_l, 2), dtype=torch.float32, device=images.device)
    n_tokens = bsz * n_l
    if n_tokens == 0:
        return gpts
    if grad_tokens.stride(0) != n_l * grad_tokens.stride(1):
        grad_tokens = grad_tokens.contiguous()  # the kernel walks tokens with one flat stride
    dummy = coords
    s_xb, s_xl = indices.stride() if indices is not None else (0, 0)
    s_nb, s_nl, s_nd = noise.stride() if noise is not None else (0, 0, 0)
    block_t, block_e = _launch_meta(patch_size, images.device)
    grid = (triton.cdiv(n_tokens, block_t),)
    _patch_bwd_kernel[grid](
        images,
        coords,
        indices if indices is not None else dummy,
        noise if noise is not None else dummy,
        grad_tokens,
        gpts,
        n_tokens,
        n_l,
        coords.shape[1],
        h,
        w,
        s_ib,
        s_iy,
        s_ix,
        s_ic,
        coords.stride(0),
        coords.stride(1),
        coords.stride(2),
        s_xb,
        s_xl,
        s_nb,
        s_nl,
        s_nd,
        grad_tokens.stride(1),
        grad_tokens.stride(2),
        P=patch_size,
        IS_U8=is_u8,
        IDX_MODE=int(indices is not None),
        NOISE_MODE=int(noise is not None),
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        num_warps=_NUM_WARPS,
    )
    return gpts


class _PatchSampleFn(torch.autograd.Function):
    """tokens = sample(images, coords[indices] + noise); gradients for coords and noise only."""

    @staticmethod
    def forward(ctx, coords, noise, images, indices, patch_size, out_dtype, num_tokens, sigma, seed, offset):  # type: ignore[override]
        coords32 = coords.float()
        noise32 = noise.float() if noise is not None else None
        tokens, idx_drawn, noise_drawn = patch_sample_forward(
            images, coords32, patch_size, indices, noise32, out_dtype, num_tokens, sigma, seed, offset=offset
        )
        idx_used = indices if indices is not None else idx_drawn
        noise_used = noise32 if noise32 is not None else noise_drawn
        ctx.save_for_backward(images, coords32, idx_used, noise_used)
        ctx.patch_size = patch_size
        ctx.coords_dtype = coords.dtype
        ctx.noise_dtype = noise.dtype if noise is not None else None
        ctx.k = coords.shape[1]
        empty_i = torch.empty(0, dtype=torch.int64, device=images.device)
        empty_f = torch.empty(0, dtype=torch.float32, device=images.device)
        idx_ret = idx_drawn if idx_drawn is not None else empty_i
        noise_ret = noise_drawn if noise_drawn is not None else empty_f
        ctx.mark_non_differentiable(idx_ret, noise_ret)
        return tokens, idx_ret, noise_ret

    @staticmethod
    def backward(ctx, g_tokens, _g_idx, _g_noise):  # type: ignore[override]
        images, coords32, idx_used, noise_used = ctx.saved_tensors
        need_coords, need_noise = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_coords or need_noise):
            return (None,) * 10
        gpts = _patch_sample_backward(images, coords32, idx_used, noise_used, g_tokens, ctx.patch_size)
        g_coords = g_noise = None
        if need_coords:
            if idx_used is None:
                g_coords = gpts
            else:
                # A landmark drawn several times receives the sum of its tokens' gradients.
                g_coords = torch.zeros((gpts.shape[0], ctx.k, 2), dtype=torch.float32, device=gpts.device)
                g_coords.scatter_add_(1, idx_used.long().unsqueeze(-1).expand(-1, -1, 2), gpts)
            g_coords = g_coords.to(ctx.coords_dtype)
        if need_noise:
            g_noise = gpts.to(ctx.noise_dtype)
        return g_coords, g_noise, None, None, None, None, None, None, None, None


def _check_request(
    images: torch.Tensor,
    coords: torch.Tensor,
    out_dtype: torch.dtype,
    indices: torch.Tensor | None,
    noise: torch.Tensor | None,
    num_tokens: int | None,
    sigma: float,
    offset: int,
) -> None:
    """ValueError naming what :func:`sample_patches_triton` cannot do with these arguments."""
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if indices is not None and num_tokens is not None:
        raise ValueError("pass either indices or num_tokens (to draw indices), not both")
    if noise is not None and sigma > 0:
        raise ValueError("pass either noise or sigma > 0 (to draw noise), not both")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if num_tokens is not None and num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if images.dtype != torch.uint8 and images.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"images dtype {images.dtype} is not supported by the Triton sampler (uint8, fp32, fp16, bf16)"
        )
    if not 0 <= int(offset) < 2**62:
        raise ValueError(f"offset must lie in [0, 2**62), got {offset}")
    if images.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            "the Triton sampler runs on CPU tensors only under TRITON_INTERPRET=1 (set before import); "
            "use backend='torch' on the CPU"
        )
    if coords.device != images.device:
        raise ValueError(f"coords on {coords.device} but images on {images.device}: put both on one device")


def sample_patches_triton(
    images: torch.Tensor,
    coords: torch.Tensor,
    patch_size: int = 8,
    *,
    indices: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    num_tokens: int | None = None,
    sigma: float = 0.0,
    seed: int | None = None,
    offset: int = 0,
    return_draws: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Landmark patches as tokens, one Triton launch (CUDA, or CPU under TRITON_INTERPRET=1).

    Args:
        images: (B, H, W, 3) uint8 (normalised ``x / 255 * 2 - 1`` in-kernel) or (B, 3, H, W)
            float in the network's range; any strides; square.
        coords: (B, K, 2) float px (x, y); differentiable.
        patch_size: P (even); tokens have 3 * P * P values.
        indices: (B, L) int landmark index per token; exclusive with ``num_tokens``.
        noise: (B, L, 2) px added to the selected coordinates; differentiable; exclusive with
            ``sigma > 0``.
        out_dtype: fp32 / bf16 / fp16; default the image float dtype (fp32 for uint8).
        num_tokens: draw L = num_tokens indices per sample uniformly with replacement from [0, K).
        sigma: draw N(0, sigma^2) px noise per token and axis (0: none).
        seed: Philox key for the draws (default: drawn from torch's default CPU generator).
        offset: Philox stream under that key (0 <= offset < 2**62), e.g. step * V + view.
        return_draws: also return the indices and noise actually used.

    Returns:
        tokens: (B, L, 3 * P * P) ``out_dtype`` in the reference layout; with ``return_draws``,
        ``(tokens, indices (B, L) int64 or None, noise (B, L, 2) fp32 or None)``: None means
        "all K in order" / "no noise". Feeding them to the twin reproduces ``tokens``.
    """
    if out_dtype is None:
        out_dtype = torch.float32 if images.dtype == torch.uint8 else images.dtype
    _check_request(images, coords, out_dtype, indices, noise, num_tokens, sigma, offset)
    if num_tokens is None and sigma == 0:
        seed, offset = 0, 0  # nothing drawn: constants (no seed drawn on the host)
    elif seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    seed = int(seed) % (2**63)
    tokens, idx_ret, noise_ret = _PatchSampleFn.apply(
        coords, noise, images, indices, patch_size, out_dtype, num_tokens, float(sigma), seed, int(offset)
    )
    if not return_draws:
        return tokens
    idx_used = indices if indices is not None else (idx_ret if num_tokens is not None else None)
    noise_used = noise if noise is not None else (noise_ret if sigma > 0 else None)
    return tokens, idx_used, noise_used
