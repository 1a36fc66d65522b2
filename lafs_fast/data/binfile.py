"""InsightFace verification ``.bin`` files (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW), read safely.

A ``.bin`` is a pickle of ``(bins, issame)``: ``bins`` a list of 2*P encoded images (JPEG bytes;
pair i is ``bins[2i], bins[2i+1]``), ``issame`` a list of P booleans. The public files were written
by Python 2 (``str`` payloads), so they are read with ``encoding="bytes"``.

A pickle can name any importable callable and call it (``os.system``...), so ``load_bin`` never uses
``pickle.load``: :class:`RestrictedUnpickler` resolves only the few globals such a file can hold
(numpy's array/scalar reconstruction, ``_codecs.encode`` that Python 3 writes for ``bytes`` under
protocol 2, ``bytes`` / ``bytearray``) and refuses every other one before anything runs.
"""

from __future__ import annotations

import contextlib
import io
import operator
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lafs_fast.io import atomic_write_bytes

__all__ = ["UnsafePickleError", "RestrictedUnpickler", "restricted_loads", "BinSet", "load_bin", "write_bin"]

# (module, name) pairs a verification .bin may reference. Each builds plain data and nothing else:
# the class argument of numpy's _reconstruct goes through find_class too, so only ndarray passes.
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("builtins", "bytes"),
        ("builtins", "bytearray"),
        ("__builtin__", "bytearray"),  # Python 2 name
    }
)


class UnsafePickleError(ValueError):
    """A pickle referenced a global outside the allow-list (it could run code); nothing was run."""


class _CheckedArray(np.ndarray):
    """What the allow-listed ``_reconstruct`` builds: its ``__setstate__`` (the pickle's BUILD)
    refuses object dtypes (numpy's object-array unpickling can crash on a crafted state) and
    charges the array's bytes to the unpickler's budget before numpy allocates them."""

    _unpickler: RestrictedUnpickler

    def __setstate__(self, state: tuple) -> None:
        shape, dtype = (state[1], state[2]) if len(state) == 5 else (state[0], state[1])
        dtype = np.dtype(dtype)
        if dtype.hasobject:
            raise UnsafePickleError(
                "refusing an array of Python objects: a verification .bin holds only image bytes and booleans"
            )
        self._unpickler.charge(int(np.prod(shape, dtype=np.float64)) * dtype.itemsize, "an array")
        super().__setstate__(state)


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only returns the globals of ``_ALLOWED_GLOBALS``.

    Every opcode that calls something (REDUCE, NEWOBJ, INST, OBJ, BUILD with ``__setstate__``)
    needs the callable first, and the callable can only come from ``find_class`` (or be an object
    built from allowed globals), so refusing there stops any payload before it runs.

    The allowed constructors that allocate by an argument (``bytes(N)``, ``bytearray(N)``, numpy's
    ``_reconstruct(ndarray, shape, dtype)`` / ``__setstate__`` / ``scalar``, ``_codecs.encode``)
    are wrapped: together they may build at most ``budget`` bytes (a file's own size: everything
    a real .bin holds is spelled out in it), checked BEFORE the allocation.
    """

    def __init__(self, file: io.BufferedIOBase, *, budget: int, **kw: Any) -> None:
        super().__init__(file, **kw)
        self.budget, self.spent = int(budget), 0

    def charge(self, nbytes: int, what: str) -> None:
        """Count ``nbytes`` about to be allocated; UnsafePickleError when past the budget."""
        self.spent += max(0, nbytes)
        if self.spent > self.budget:
            raise UnsafePickleError(
                f"refusing to build {what} of {nbytes} bytes: the pickle would allocate more than the {self.budget} "
                "bytes "
                "its own size allows, so it is corrupt or crafted; get the set from a trusted source"
            )

    @staticmethod
    def _sized(x: Any) -> int:
        """The most bytes ``bytes(x)`` / ``bytearray(x)`` can allocate: ``x`` itself as a count when
        it is one (any integer type, numpy's too), else its buffer's or its length."""
        sizes = [0]
        with contextlib.suppress(TypeError, ValueError, OverflowError):
            sizes.append(operator.index(x))
        with contextlib.suppress(TypeError, ValueError, OverflowError):
            sizes.append(memoryview(x).nbytes)
        if isinstance(x, str):  # encoded: at most its UTF-8 length (what the file spelled out)
            sizes.append(len(x.encode("utf-8", "surrogatepass")))
        else:
            with contextlib.suppress(TypeError, ValueError, OverflowError):
                sizes.append(len(x))
        return max(sizes)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"refusing to load {module}.{name}: a verification .bin holds only image bytes and booleans, "
                "so this file is corrupt or crafted to run code; get the set from a trusted source"
            )
        real = super().find_class(module, name)
        if name in ("bytes", "bytearray"):

            def build(*args: Any) -> Any:
                self.charge(self._sized(args[0]) if args else 0, f"{name}()")
                return real(*args)

            return build
        if name == "_reconstruct":

            def reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
                if subtype is not np.ndarray:
                    raise UnsafePickleError(
                        f"refusing to reconstruct a {getattr(subtype, '__name__', subtype)}: only plain numpy arrays"
                    )
                self.charge(int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize, "an array")
                arr = real(_CheckedArray, shape, dtype)
                arr._unpickler = self
                return arr

            return reconstruct
        if name == "scalar":

            def scalar(dtype: Any, *args: Any) -> Any:
                if np.dtype(dtype).hasobject:
                    raise UnsafePickleError(
                        "refusing a numpy object scalar: a verification .bin holds only image bytes and booleans"
                    )
                self.charge(np.dtype(dtype).itemsize, "a numpy scalar")
                return real(dtype, *args)

            return scalar
        if name == "encode":

            def encode(obj: Any, *args: Any) -> Any:
                out = real(obj, *args)  # at most a few bytes per character of a string the file spelled out
                self.charge(self._sized(out), "encoded bytes")
                return out

            return encode
        return real

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing a pickle with persistent ids: not a verification .bin")


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (Python 2 strings come back as bytes);
    the constructors, and the copies of objects the pickle refers to more than once, may allocate
    at most about the size of ``data`` itself."""
    unpickler = RestrictedUnpickler(io.BytesIO(data), encoding="bytes", budget=2 * len(data) + 4096)
    return _plain(unpickler.load(), unpickler)


def _footprint(x: Any) -> int:
    """Bytes a copy of ``x`` costs (its buffer, or 8 per item of a list / tuple; 0 for a scalar)."""
    if isinstance(x, (list, tuple)):
        return 8 * len(x)
    if isinstance(x, (bytes, bytearray, np.ndarray)):
        return memoryview(x).nbytes if not isinstance(x, np.ndarray) else int(x.nbytes)
    return 0


def _plain(obj: Any, unpickler: RestrictedUnpickler) -> Any:
    """The loaded objects, two levels deep (a .bin is a pair of lists), with every checked array
    turned back into a plain ndarray. A pickle can refer to one object many times for a few bytes
    each (one image listed 10,000 times); every reference after the first is charged to the budget
    at the size of the copy or decode it will cost downstream."""
    seen: set[int] = set()

    def walk(x: Any, depth: int) -> Any:
        if id(x) in seen:
            unpickler.charge(_footprint(x), "another copy of an object it refers to again")
        seen.add(id(x))
        if isinstance(x, _CheckedArray):
            return x.view(np.ndarray)
        if depth >= 2 or not isinstance(x, (list, tuple)):
            return x
        items = [walk(v, depth + 1) for v in x]
        return items if isinstance(x, list) else tuple(items)

    return walk(obj, 0)


@dataclass
class BinSet:
    """A verification set. ``images``: 2*P encoded images (bytes); ``issame``: (P,) bool."""

    name: str
    images: list[bytes]
    issame: np.ndarray

    @property
    def num_pairs(self) -> int:
        return int(self.issame.shape[0])


def _as_bytes(x: Any, i: int, path: Path) -> bytes:
    if isinstance(x, (bytes, bytearray)):
        return bytes(x)
    if isinstance(x, np.ndarray) and x.dtype == np.uint8:
        return x.tobytes()
    if isinstance(x, str):  # a Python 2 str read with encoding="latin1" by another tool
        return x.encode("latin1")
    raise ValueError(f"{path}: image {i} is a {type(x).__name__}, not encoded image bytes; not a verification .bin")


def load_bin(path: str | Path) -> BinSet:
    """Read a verification ``.bin`` safely (see the module doc). Raises FileNotFoundError, or
    ValueError (:class:`UnsafePickleError` for a refused global) naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification set {path} does not exist; pass the path of a .bin such as lfw.bin")
    try:
        obj = restricted_loads(path.read_bytes())
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from None
    except Exception as exc:  # truncated / not a pickle
        why = " ".join(str(exc).split())  # one line, whatever the pickle's strings held
        raise ValueError(f"{path} is not a readable verification .bin ({type(exc).__name__}: {why})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path} does not hold (images, issame): not a verification .bin")
    bins, issame = obj
    if isinstance(bins, np.ndarray):
        bins = list(bins)
    if not isinstance(bins, list):
        raise ValueError(f"{path}: the image list is a {type(bins).__name__}; not a verification .bin")
    images = [_as_bytes(b, i, path) for i, b in enumerate(bins)]
    same = _is_same(issame, path)
    if len(images) != 2 * same.shape[0]:
        raise ValueError(
            f"{path}: {len(images)} images for {same.shape[0]} pairs (need exactly 2 per pair); the file is damaged"
        )
    if same.shape[0] == 0:
        raise ValueError(f"{path} holds no pairs")
    return BinSet(path.stem, images, same)


def _is_same(issame: object, path: Path) -> np.ndarray:
    """The (P,) bool labels of a .bin: every value must be true / false (or 0 / 1); a NaN or any other
    value would otherwise turn into True and score a pair as genuine."""
    if isinstance(issame, (list, tuple)) and not all(isinstance(v, (bool, int, float, np.generic)) for v in issame):
        issame = None  # nested lists: refused before numpy builds an array of their product's size
    try:
        raw = np.asarray(issame).reshape(-1)
        ok = raw.dtype.kind in "biuf" and bool(np.all((raw == 0) | (raw == 1)))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{path}: the is-same list holds values other than true / false; the file is damaged")
    return raw.astype(bool)


def write_bin(path: str | Path, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write ``(list of image bytes, list of bool)`` as InsightFace does (highest protocol),
    atomically. ``images``: 2*P encoded images; ``issame``: P booleans."""
    images = [bytes(b) for b in images]
    same = [bool(s) for s in issame]
    if len(images) != 2 * len(same):
        raise ValueError(f"write_bin needs 2 images per pair: got {len(images)} images for {len(same)} pairs")
    atomic_write_bytes(pickle.dumps((images, same), protocol=pickle.HIGHEST_PROTOCOL), path)
