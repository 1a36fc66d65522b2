"""LAFS multi-view augmentation in Triton: three launches for all B * V views.

1. ``_view_kernel`` (one program per view): crop + resize (bilinear or bicubic) + flip straight from
   the uint8 NHWC sources, writing the clean normalised view, then colour jitter in the view's own
   random order and grayscale. Contrast blends with the grey mean of the view as it stands when
   contrast comes up in the order, so a first sweep over the view's tiles applies the ops before
   contrast and reduces that mean (recomputing the cheap resample rather than storing it), and a
   second sweep applies everything. A view without blur is finished here (solarize, ``x * 2 - 1``,
   output dtype): one pass. A blurred view goes to an fp32 [0, 1] scratch.
2. ``_blur_h_kernel``: horizontal Gaussian taps (reflect padding), per-view sigma, blurred views only.
3. ``_blur_v_kernel``: vertical taps, then solarize and ``x * 2 - 1`` into the output dtype.

Parameters come from ``kernels.augment.draw_view_params`` (drawn on the device; no host round trip
per sample) and the maths mirrors the torch twin ``kernels.augment.apply_views_torch`` operation
for operation, so the two agree to float rounding (the twin is the oracle).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lafs_fast.kernels.augment import INTERPOLATIONS, ViewParams, blur_weights

__all__ = ["apply_views_triton"]

# Pixels per tile (fixed meta-parameters: the interpreter cannot autotune). On CUDA 512 pixels
# over 8 warps (2 per thread): 57 registers for the view kernel on sm_90 (1024 needed 113).
# Under the interpreter a program costs Python time per operation, so larger tiles.
_BLOCK = 512
_BLOCK_INTERPRETER = 1024
_NUM_WARPS = 8


@triton.jit
def _tap(src, k: tl.constexpr, length, start, BICUBIC: tl.constexpr):
    """Source index (int32, absolute) and weight of tap k for crop-local coordinate ``src``."""
    if BICUBIC:
        fl = tl.floor(src)
        t = src - fl
        i = fl.to(tl.int32) + (k - 1)
        i = tl.minimum(tl.maximum(i, 0), length - 1)
        if k == 0:
            x = t + 1.0
            w = ((-0.75 * x - -3.75) * x + -6.0) * x - -3.0
        elif k == 1:
            w = (1.25 * t - 2.25) * t * t + 1.0
        elif k == 2:
            x = 1.0 - t
            w = (1.25 * x - 2.25) * x * x + 1.0
        else:
            x = (1.0 - t) + 1.0
            w = ((-0.75 * x - -3.75) * x + -6.0) * x - -3.0
    else:
        s = tl.maximum(src, 0.0)
        fl = tl.floor(s)
        lam = s - fl
        i = fl.to(tl.int32)
        if k == 0:
            w = 1.0 - lam
        else:
            i = i + (i < length - 1).to(tl.int32)
            w = lam
    return start + i, w


@triton.jit
def _resample(
    img_ptr,
    b,
    p,
    m,
    S,
    top,
    left,
    ch,
    cw,
    flip,
    scale_y,
    scale_x,
    s_ib,
    s_iy,
    s_ix,
    s_ic,
    BICUBIC: tl.constexpr,
):
    """Resampled (r, g, b) in [0, 255] fp32 for the flat output pixels ``p`` of one view."""
    oy = p // S
    ox = p - oy * S
    dx = tl.where(flip != 0, (S - 1) - ox, ox).to(tl.float32)
    dy = oy.to(tl.float32)
    srcx = scale_x * (dx + 0.5) - 0.5
    srcy = scale_y * (dy + 0.5) - 0.5
    T: tl.constexpr = 4 if BICUBIC else 2
    base = img_ptr + b.to(tl.int64) * s_ib
    v0 = tl.zeros_like(srcx)
    v1 = tl.zeros_like(srcx)
    v2 = tl.zeros_like(srcx)
    for j in tl.static_range(T):
        ix, wx = _tap(srcx, j, cw, left, BICUBIC)
        r0 = tl.zeros_like(srcx)
        r1 = tl.zeros_like(srcx)
        r2 = tl.zeros_like(srcx)
        for i in tl.static_range(T):
            iy, wy = _tap(srcy, i, ch, top, BICUBIC)
            ptr = base + iy * s_iy + ix * s_ix
            r0 = r0 + wy * tl.load(ptr, mask=m, other=0).to(tl.float32)
            r1 = r1 + wy * tl.load(ptr + s_ic, mask=m, other=0).to(tl.float32)
            r2 = r2 + wy * tl.load(ptr + 2 * s_ic, mask=m, other=0).to(tl.float32)
        v0 = v0 + wx * r0
        v1 = v1 + wx * r1
        v2 = v2 + wx * r2
    v0 = tl.minimum(tl.maximum(v0, 0.0), 255.0)
    v1 = tl.minimum(tl.maximum(v1, 0.0), 255.0)
    v2 = tl.minimum(tl.maximum(v2, 0.0), 255.0)
    return v0, v1, v2


@triton.jit
def _gray(r, g, b):
    return 0.2989 * r + 0.587 * g + 0.114 * b


@triton.jit
def _clamp01(x):
    return tl.minimum(tl.maximum(x, 0.0), 1.0)


@triton.jit
def _hue(r, g, b, shift):
    """torchvision adjust_hue: rgb -> hsv, h = (h + shift) % 1, hsv -> rgb (same float ops as the twin)."""
    maxc = tl.maximum(tl.maximum(r, g), b)
    minc = tl.minimum(tl.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    s = tl.div_rn(cr, tl.where(eqc, 1.0, maxc))
    crd = tl.where(eqc, 1.0, cr)
    rc = tl.div_rn(maxc - r, crd)
    gc = tl.div_rn(maxc - g, crd)
    bc = tl.div_rn(maxc - b, crd)
    hr = tl.where(maxc == r, bc - gc, 0.0)
    hg = tl.where((maxc == g) & (maxc != r), 2.0 + rc - bc, 0.0)
    hb = tl.where((maxc != g) & (maxc != r), 4.0 + gc - rc, 0.0)
    h = hr + hg + hb
    h = tl.div_rn(h, 6.0) + 1.0
    h = h - tl.floor(h)
    h = h + shift
    h = tl.where(h >= 1.0, h - 1.0, h)
    h = tl.where(h < 0.0, h + 1.0, h)
    v = maxc
    h6 = h * 6.0
    fi = tl.floor(h6)
    f = h6 - fi
    i = fi.to(tl.int32) % 6
    p = _clamp01(v * (1.0 - s))
    q = _clamp01(v * (1.0 - s * f))
    t = _clamp01(v * (1.0 - s * (1.0 - f)))
    # (r, g, b) per sector i: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q)
    ro = tl.where(i == 0, v, tl.where(i == 1, q, tl.where(i == 2, p, tl.where(i == 3, p, tl.where(i == 4, t, v)))))
    go = tl.where(i == 0, t, tl.where(i == 1, v, tl.where(i == 2, v, tl.where(i == 3, q, tl.where(i == 4, p, p)))))
    bo = tl.where(i == 0, p, tl.where(i == 1, p, tl.where(i == 2, t, tl.where(i == 3, v, tl.where(i == 4, v, q)))))
    return ro, go, bo


@triton.jit
def _jitter(r, g, b, op, f, mean):
    """Jitter op ``op`` (0 brightness, 1 contrast about ``mean``, 2 saturation, 3 hue) with factor f."""
    if op == 0:
        r = _clamp01(f * r)
        g = _clamp01(f * g)
        b = _clamp01(f * b)
    elif op == 1:
        r = _clamp01(f * r + (1.0 - f) * mean)
        g = _clamp01(f * g + (1.0 - f) * mean)
        b = _clamp01(f * b + (1.0 - f) * mean)
    elif op == 2:
        gr = _gray(r, g, b)
        r = _clamp01(f * r + (1.0 - f) * gr)
        g = _clamp01(f * g + (1.0 - f) * gr)
        b = _clamp01(f * b + (1.0 - f) * gr)
    else:
        r, g, b = _hue(r, g, b, f)
    return r, g, b


@triton.jit
def _finish(out_ptr, off, npix, m, r, g, b, sol, thr):
    """Solarize (x >= thr -> 1 - x) when ``sol``, then x * 2 - 1 into out's dtype at planes off + c * npix."""
    if sol != 0:
        r = tl.where(r >= thr, 1.0 - r, r)
        g = tl.where(g >= thr, 1.0 - g, g)
        b = tl.where(b >= thr, 1.0 - b, b)
    ety = out_ptr.dtype.element_ty
    d = out_ptr + off
    tl.store(d, (r * 2.0 - 1.0).to(ety), mask=m)
    tl.store(d + npix, (g * 2.0 - 1.0).to(ety), mask=m)
    tl.store(d + 2 * npix, (b * 2.0 - 1.0).to(ety), mask=m)


@triton.jit
def _view_kernel(
    img_ptr,
    crop_ptr,
    flags_ptr,
    fac_ptr,
    order_ptr,
    sigma_ptr,
    sol_ptr,
    thr_ptr,
    clean_ptr,
    pre_ptr,
    aug_ptr,
    V,
    S,
    s_ib,
    s_iy,
    s_ix,
    s_ic,
    BICUBIC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One view n: clean (3, S, S) normalised into clean_ptr; then jitter / grey, and either
    solarize + normalise straight into aug_ptr (no blur: the common case finishes in this one pass)
    or the [0, 1] values into pre_ptr for the blur passes."""
    n = tl.program_id(0)
    b = n // V
    top = tl.load(crop_ptr + n * 4)
    left = tl.load(crop_ptr + n * 4 + 1)
    ch = tl.load(crop_ptr + n * 4 + 2)
    cw = tl.load(crop_ptr + n * 4 + 3)
    flip = tl.load(flags_ptr + n * 4)
    jit = tl.load(flags_ptr + n * 4 + 1)
    gray = tl.load(flags_ptr + n * 4 + 2)
    blur = tl.load(sigma_ptr + n) > 0
    sol = tl.load(sol_ptr + n)
    thr = tl.load(thr_ptr + n)
    scale_y = tl.div_rn(ch.to(tl.float32), S.to(tl.float32))
    scale_x = tl.div_rn(cw.to(tl.float32), S.to(tl.float32))
    npix = S * S
    plane = n.to(tl.int64) * 3 * npix
    lanes = tl.arange(0, BLOCK)

    mean = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), axis=0)  # an fp32 scalar for both branches
    if jit != 0:
        # Sweep 1: the grey mean of the view as contrast finds it (after the ops before it).
        o0 = tl.load(order_ptr + n * 4)
        o1 = tl.load(order_ptr + n * 4 + 1)
        o2 = tl.load(order_ptr + n * 4 + 2)
        cpos = tl.where(o0 == 1, 0, tl.where(o1 == 1, 1, tl.where(o2 == 1, 2, 3)))
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for t0 in range(0, npix, BLOCK):
            p = t0 + lanes
            m = p < npix
            r, g, bl = _resample(
                img_ptr, b, p, m, S, top, left, ch, cw, flip, scale_y, scale_x, s_ib, s_iy, s_ix, s_ic, BICUBIC
            )
            r = tl.div_rn(r, 255.0)
            g = tl.div_rn(g, 255.0)
            bl = tl.div_rn(bl, 255.0)
            for step in tl.static_range(3):
                if step < cpos:
                    op = tl.load(order_ptr + n * 4 + step)
                    f = tl.load(fac_ptr + n * 4 + op)
                    r, g, bl = _jitter(r, g, bl, op, f, 0.0)
            acc += tl.where(m, _gray(r, g, bl), 0.0)
        mean = tl.div_rn(tl.sum(acc, axis=0), npix.to(tl.float32))

    for t0 in range(0, npix, BLOCK):
        p = t0 + lanes
        m = p < npix
        r, g, bl = _resample(
            img_ptr, b, p, m, S, top, left, ch, cw, flip, scale_y, scale_x, s_ib, s_iy, s_ix, s_ic, BICUBIC
        )
        cptr = clean_ptr + plane + p
        ety = clean_ptr.dtype.element_ty
        tl.store(cptr, (tl.div_rn(r, 255.0) * 2.0 - 1.0).to(ety), mask=m)
        tl.store(cptr + npix, (tl.div_rn(g, 255.0) * 2.0 - 1.0).to(ety), mask=m)
        tl.store(cptr + 2 * npix, (tl.div_rn(bl, 255.0) * 2.0 - 1.0).to(ety), mask=m)
        r = tl.div_rn(r, 255.0)
        g = tl.div_rn(g, 255.0)
        bl = tl.div_rn(bl, 255.0)
        if jit != 0:
            for step in tl.static_range(4):
                op = tl.load(order_ptr + n * 4 + step)
                f = tl.load(fac_ptr + n * 4 + op)
                r, g, bl = _jitter(r, g, bl, op, f, mean)
        if gray != 0:
            gr = _gray(r, g, bl)
            r = gr
            g = gr
            bl = gr
        if blur:
            pptr = pre_ptr + plane + p
            tl.store(pptr, r, mask=m)
            tl.store(pptr + npix, g, mask=m)
            tl.store(pptr + 2 * npix, bl, mask=m)
        else:
            _finish(aug_ptr, plane + p, npix, m, r, g, bl, sol, thr)


@triton.jit
def _reflect(i, size):
    i = tl.where(i < 0, -i, i)
    return tl.where(i > size - 1, 2 * (size - 1) - i, i)


@triton.jit
def _blur_taps(src_ptr, w_ptr, n, p, m, plane, S, R: tl.constexpr, VERTICAL: tl.constexpr, BLOCK: tl.constexpr):
    """The 2R+1 Gaussian taps of view n along x (or y when VERTICAL), reflect padding, for the
    pixels p of one tile: three (BLOCK,) fp32 channel sums."""
    npix = S * S
    y = p // S
    x = p - y * S
    a0 = tl.zeros([BLOCK], dtype=tl.float32)
    a1 = tl.zeros([BLOCK], dtype=tl.float32)
    a2 = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(2 * R + 1):
        w = tl.load(w_ptr + n * (2 * R + 1) + k)
        if VERTICAL:
            q = src_ptr + plane + _reflect(y + (k - R), S) * S + x
        else:
            q = src_ptr + plane + y * S + _reflect(x + (k - R), S)
        a0 = a0 + w * tl.load(q, mask=m, other=0.0)
        a1 = a1 + w * tl.load(q + npix, mask=m, other=0.0)
        a2 = a2 + w * tl.load(q + 2 * npix, mask=m, other=0.0)
    return a0, a1, a2


@triton.jit
def _blur_h_kernel(src_ptr, dst_ptr, w_ptr, sigma_ptr, S, R: tl.constexpr, BLOCK: tl.constexpr):
    """dst[n, c, y, x] = sum_k w[n, k] * src[n, c, y, reflect(x + k - R)]; grid (N, tiles).
    Views without blur were finished by the view kernel: their programs do nothing."""
    n = tl.program_id(0)
    sig = tl.load(sigma_ptr + n)
    if sig > 0:
        p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        npix = S * S
        m = p < npix
        plane = n.to(tl.int64) * 3 * npix
        a0, a1, a2 = _blur_taps(src_ptr, w_ptr, n, p, m, plane, S, R, False, BLOCK)
        d = dst_ptr + plane + p
        tl.store(d, a0, mask=m)
        tl.store(d + npix, a1, mask=m)
        tl.store(d + 2 * npix, a2, mask=m)


@triton.jit
def _blur_v_kernel(src_ptr, out_ptr, w_ptr, sigma_ptr, sol_ptr, thr_ptr, S, R: tl.constexpr, BLOCK: tl.constexpr):
    """Vertical taps, then solarize and x * 2 - 1 into out's dtype (blurred views only)."""
    n = tl.program_id(0)
    sig = tl.load(sigma_ptr + n)
    if sig > 0:
        p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        npix = S * S
        m = p < npix
        plane = n.to(tl.int64) * 3 * npix
        a0, a1, a2 = _blur_taps(src_ptr, w_ptr, n, p, m, plane, S, R, True, BLOCK)
        _finish(out_ptr, plane + p, npix, m, a0, a1, a2, tl.load(sol_ptr + n), tl.load(thr_ptr + n))


def apply_views_triton(
    images: torch.Tensor,
    params: ViewParams,
    out_size: int = 112,
    *,
    interpolation: str = "bilinear",
    out_dtype: torch.dtype = torch.float32,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render clean and augmented views with the Triton kernels (same contract as the twin).

    Args:
        images: (B, H, W, 3) uint8 source faces (any strides), on CUDA (or CPU under
            TRITON_INTERPRET=1).
        params: ViewParams for B * V views on the same device.
        out_size: S.
        interpolation: "bilinear" or "bicubic".
        out_dtype: fp32 / bf16 / fp16.
        out: optional preallocated contiguous (clean, augmented), each (B, V, 3, S, S) ``out_dtype``.

    Returns:
        clean: (B, V, 3, S, S) ``out_dtype``; augmented: (B, V, 3, S, S) ``out_dtype``.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3) uint8, got {tuple(images.shape)} {images.dtype}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if images.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            "the Triton view kernels run on CPU tensors only under TRITON_INTERPRET=1 (set before import); "
            "use backend='torch' on the CPU"
        )
    b = images.shape[0]
    v = params.num_views
    n = b * v
    if params.crop.shape[0] != n:
        raise ValueError(f"params hold {params.crop.shape[0]} views, expected B * V = {n}")
    dev = images.device
    s = int(out_size)
    shape = (b, v, 3, s, s)
    if out is None:
        clean = torch.empty(shape, dtype=out_dtype, device=dev)
        aug = torch.empty(shape, dtype=out_dtype, device=dev)
    else:
        clean, aug = out
        for t in (clean, aug):
            if tuple(t.shape) != shape or t.dtype != out_dtype or not t.is_contiguous():
                raise ValueError(f"out tensors must be contiguous {shape} {out_dtype}")
    if n == 0:
        return clean, aug
    crop = params.crop.to(device=dev, dtype=torch.int32).contiguous()
    zeros = torch.zeros(n, dtype=torch.int32, device=dev)
    flags = torch.stack(
        [params.flip.to(torch.int32), params.jitter.to(torch.int32), params.gray.to(torch.int32), zeros], 1
    )
    factors = params.factors.to(device=dev, dtype=torch.float32).contiguous()
    order = params.order.to(device=dev, dtype=torch.int32).contiguous()
    r = params.blur_halfwidth
    wts = blur_weights(params.blur_sigma.to(dev), r)
    sigma = params.blur_sigma.to(device=dev, dtype=torch.float32).contiguous()
    sol = params.solarize.to(device=dev, dtype=torch.int32).contiguous()
    thr = params.solarize_threshold.to(device=dev, dtype=torch.float32).contiguous()
    # fp32 scratch for the blurred views (full size; views without blur never touch it)
    pre = torch.empty(shape, dtype=torch.float32, device=dev)
    block = _BLOCK if dev.type == "cuda" else _BLOCK_INTERPRETER
    sb, sy, sx, sc = images.stride()
    _view_kernel[(n,)](
        images,
        crop,
        flags.contiguous(),
        factors,
        order,
        sigma,
        sol,
        thr,
        clean,
        pre,
        aug,
        v,
        s,
        sb,
        sy,
        sx,
        sc,
        BICUBIC=interpolation == "bicubic",
        BLOCK=block,
        num_warps=_NUM_WARPS,
    )
    tmp = torch.empty_like(pre)
    grid = (n, triton.cdiv(s * s, block))
    _blur_h_kernel[grid](pre, tmp, wts, sigma, s, R=r, BLOCK=block, num_warps=_NUM_WARPS)
    _blur_v_kernel[grid](tmp, aug, wts, sigma, sol, thr, s, R=r, BLOCK=block, num_warps=_NUM_WARPS)
    return clean, aug
