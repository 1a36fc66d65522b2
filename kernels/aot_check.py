"""Compile the project's Triton kernels for an NVIDIA target without a GPU (a codegen guard).

The interpreter (TRITON_INTERPRET=1) checks the maths but not code generation: type mismatches
between the branches of a runtime ``if``, unsupported ops, register spills. Triton can lower a
kernel to a cubin for a given ``GPUTarget`` with its bundled LLVM and ptxas and no driver, so this
module compiles every launched variant for sm_90 (H100/H200) and reports registers and stack, and
fails a variant whose PTX holds an approximate fp32 division (``div.full.f32`` / ``div.approx.f32``:
what a plain fp32 ``/`` lowers to; 2 ulp, not the torch twin's correctly rounded quotient; the
kernels divide with ``tl.div_rn``).

    env -u TRITON_INTERPRET python -m lafs_fast.kernels.aot_check [all|patch|views|quick]

``quick`` (used by the test suite, ~20 s cold) compiles one variant of each code path: the patch
forward with in-kernel draws from uint8, with given draws from float, the backward, the bilinear
view kernel and the vertical blur.

Exit status 0 when every variant compiles with no approximate division. Must run with TRITON_INTERPRET
unset (the kernels must be real JITFunctions).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

__all__ = ["compile_variant", "variants", "main"]


def compile_variant(fn, types: dict[str, str], constexprs: dict, *, arch: int = 90, num_warps: int = 8) -> dict:
    """Compile ``fn`` for sm_``arch``; args not in ``types``/``constexprs`` are i32 scalars.

    Returns {"regs": int | None, "stack": int | None} read from the cubin (cuobjdump) and
    "approx_div": the number of approximate fp32 divisions in the PTX.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: ("constexpr" if name in constexprs else types.get(name, "i32")) for name in fn.arg_names}
    kernel = triton.compile(
        ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}
    )
    approx_div = len(_APPROX_DIV.findall(kernel.asm["ptx"]))
    regs = stack = None
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(tool):
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(kernel.asm["cubin"])
        try:
            out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        finally:
            os.unlink(f.name)
        m = re.search(r"REG:(\d+) STACK:(\d+)", out)
        if m:
            regs, stack = int(m.group(1)), int(m.group(2))
    return {"regs": regs, "stack": stack, "approx_div": approx_div}


_APPROX_DIV = re.compile(r"\bdiv\.(?:full|approx)(?:\.ftz)?\.f32\b")


_QUICK = {"patch fwd u8=True mode=2", "patch fwd u8=False mode=1", "patch bwd", "view bicubic=False", "blur v"}


def variants(which: str = "all") -> list[tuple[str, object, dict, dict, int]]:
    """(label, kernel, pointer/scalar types, constexprs, num_warps) for every launched variant."""
    if which == "quick":
        return [v for v in variants("all") if v[0] in _QUICK]
    if which not in ("all", "patch", "views"):
        raise ValueError(f"unknown selection {which!r}: all, patch, views or quick")
    out = []
    if which in ("patch", "all"):
        out += _patch_variants()
    if which in ("views", "all"):
        out += _view_variants()
    return out


def _patch_variants() -> list[tuple[str, object, dict, dict, int]]:
    """The patch sampler's forward (uint8 / float images x index and noise modes) and backward."""
    from lafs_fast.kernels import patch_sampling_triton as P

    out = []
    for u8 in (True, False):
        for mode in (0, 1, 2):
            types = {
                "img_ptr": "*u8" if u8 else "*fp32",
                "coords_ptr": "*fp32",
                "idx_ptr": "*i64",
                "noise_ptr": "*fp32",
                "out_ptr": "*bf16",
                "idx_out_ptr": "*i32",
                "noise_out_ptr": "*fp32",
                "seed": "i64",
                "sigma": "fp32",
            }
            ce = dict(P=8, IS_U8=u8, IDX_MODE=mode, NOISE_MODE=mode, BLOCK_T=P._BLOCK_T, BLOCK_E=256)
            out.append((f"patch fwd u8={u8} mode={mode}", P._patch_fwd_kernel, types, ce, P._NUM_WARPS))
    types = {
        "img_ptr": "*u8",
        "coords_ptr": "*fp32",
        "idx_ptr": "*i64",
        "noise_ptr": "*fp32",
        "gout_ptr": "*bf16",
        "gpts_ptr": "*fp32",
    }
    ce = dict(P=8, IS_U8=True, IDX_MODE=1, NOISE_MODE=1, BLOCK_T=P._BLOCK_T, BLOCK_E=256)
    out.append(("patch bwd", P._patch_bwd_kernel, types, ce, P._NUM_WARPS))
    return out


def _view_variants() -> list[tuple[str, object, dict, dict, int]]:
    """The view kernel (bilinear, bicubic) and the two blur passes."""
    from lafs_fast.kernels import augment_triton as VT

    out = []
    for bicubic in (False, True):
        types = {
            "img_ptr": "*u8",
            "crop_ptr": "*i32",
            "flags_ptr": "*i32",
            "fac_ptr": "*fp32",
            "order_ptr": "*i32",
            "sigma_ptr": "*fp32",
            "sol_ptr": "*i32",
            "thr_ptr": "*fp32",
            "clean_ptr": "*bf16",
            "pre_ptr": "*fp32",
            "aug_ptr": "*bf16",
        }
        out.append(
            (
                f"view bicubic={bicubic}",
                VT._view_kernel,
                types,
                dict(BICUBIC=bicubic, BLOCK=VT._BLOCK),
                VT._NUM_WARPS,
            )
        )
    out.append(
        (
            "blur h",
            VT._blur_h_kernel,
            {"src_ptr": "*fp32", "dst_ptr": "*fp32", "w_ptr": "*fp32", "sigma_ptr": "*fp32"},
            dict(R=6, BLOCK=VT._BLOCK),
            VT._NUM_WARPS,
        )
    )
    out.append(
        (
            "blur v",
            VT._blur_v_kernel,
            {
                "src_ptr": "*fp32",
                "out_ptr": "*bf16",
                "w_ptr": "*fp32",
                "sigma_ptr": "*fp32",
                "sol_ptr": "*i32",
                "thr_ptr": "*fp32",
            },
            dict(R=6, BLOCK=VT._BLOCK),
            VT._NUM_WARPS,
        )
    )
    return out


def main(argv: list[str] | None = None) -> int:
    """Compile the selected variants; print one line each; 0 when all compile."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the AOT check needs real JIT functions", file=sys.stderr)
        return 2
    which = (argv or sys.argv[1:] or ["all"])[0]
    failed = 0
    for label, fn, types, ce, warps in variants(which):
        try:
            res = compile_variant(fn, types, ce, num_warps=warps)
            line = f"{label}: regs={res['regs']} stack={res['stack']} approx_div={res['approx_div']}"
            if res["approx_div"]:
                failed += 1
                print(f"FAIL {line} (approximate fp32 division: use tl.div_rn)")
            else:
                print(f"ok   {line}")
        except Exception as exc:  # report every failing variant, not just the first
            failed += 1
            print(f"FAIL {label}: {type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
