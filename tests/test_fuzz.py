"""Fuzzing every parser of a user's file (issue 25, item 6): the RecordIO framing and reader, the
``.idx`` parser, the ``.bin`` unpickler, the YAML config and ``key=value`` overrides, the landmark
sidecar and the checkpoint loader.

Property: any bytes give either a result or one of the user errors the CLI prints as one line with
exit 2 (``lafs_fast.errors.USER_ERRORS``), never another exception, a hang (each example runs under
an alarm) or a huge allocation (each example runs with at most 1 GiB more address space than the
process holds). Inputs are valid files (built here, small) with random mutations, and raw bytes.

In CI each target draws a fixed, derandomized set of examples (no example database), seconds in all,
the same on every run. ``LAFS_TEST_FUZZ=1`` draws 50x as many fresh ones each run (a search). A crash
found here becomes a fixed case in tests/test_fuzz_cases.py next to its fix.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import resource
import signal
import string
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="the test extra installs hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lafs_fast.config import PRESETS, Config, load_config  # noqa: E402
from lafs_fast.data.binfile import load_bin  # noqa: E402
from lafs_fast.data.recordio import (  # noqa: E402
    MAGIC_BYTES,
    CorruptRecordError,
    IRHeader,
    RecordIOReader,
    decode_record,
    encode_record,
    first_label,
    pack,
    unpack,
)
from lafs_fast.dense_landmarks import LandmarkSidecar  # noqa: E402
from lafs_fast.errors import USER_ERRORS  # noqa: E402
from lafs_fast.io import safe_load  # noqa: E402

SEARCH = os.environ.get("LAFS_TEST_FUZZ") == "1"
EXTRA_BYTES = 1 << 30  # the most address space one example may add (a huge allocation fails instead)
SECONDS = 20  # the most one example may run (a hang fails instead)


def fuzz_settings(examples: int) -> settings:
    """``examples`` fixed examples in CI, 50x fresh ones under LAFS_TEST_FUZZ=1."""
    return settings(
        max_examples=examples * (50 if SEARCH else 1),
        derandomize=not SEARCH,
        database=None,
        deadline=None,  # the alarm below bounds an example; timing a loaded 2-core machine would be flaky
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


@contextlib.contextmanager
def bounded() -> Iterator[None]:
    """Run the block with an alarm after SECONDS and RLIMIT_AS at the current size + EXTRA_BYTES:
    a hang raises TimeoutError, a huge allocation MemoryError (or torch's RuntimeError), both of
    which fail the property. pytest-timeout's own alarm is restored afterwards."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"an example ran over {SECONDS} s")

    statm = Path("/proc/self/statm")  # Linux; elsewhere only the alarm applies
    size = int(statm.read_text().split()[0]) * resource.getpagesize() if statm.exists() else None
    old_limit = resource.getrlimit(resource.RLIMIT_AS)
    old_handler = signal.signal(signal.SIGALRM, expired)
    old_timer = signal.setitimer(signal.ITIMER_REAL, SECONDS)[0]
    if size is not None:
        hard = old_limit[1]
        soft = size + EXTRA_BYTES if hard == resource.RLIM_INFINITY else min(size + EXTRA_BYTES, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old_limit)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_timer:
            signal.setitimer(signal.ITIMER_REAL, old_timer)


def holds(parse: Callable[[], Any]) -> Any:
    """The property: ``parse()`` returns, or raises a user error of one line; anything else fails."""
    with bounded():
        try:
            return parse()
        except USER_ERRORS as exc:
            text = str(exc).strip()
            assert text and "\n" not in text, f"a user error of several lines: {text!r}"
            return exc


def holds_on_file(data: bytes, name: str, parse: Callable[[Path], Any]) -> Any:
    """:func:`holds` for a reader of a file: ``data`` written to a file ``name`` in a fresh folder."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        return holds(lambda: parse(path))


# 32-bit edge values; then the float32 bit patterns of 1e9, 2^31, +inf and NaN (a label or an identity
# range past what a rec holds)
_EDGE_WORDS = [
    0,
    1,
    2,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
    1 << 29,
    1 << 30,
    0x4E6E6B28,
    0x4F000000,
    0x7F800000,
    0x7FC00000,
]


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with a few random edits: bytes overwritten, a slice cut out or inserted, a cut end."""
    data = bytearray(base)
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["set", "delete", "insert", "truncate", "word"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "word" and len(data) >= 4:  # a 32-bit field set to an edge value
            word = draw(st.sampled_from(_EDGE_WORDS))
            data[at : at + 4] = word.to_bytes(4, "little")
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "truncate":
            del data[at:]
    return bytes(data)


def some_bytes(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Mostly mutations of a valid file, sometimes raw bytes."""
    return st.one_of(valid, valid.flatmap(mutated), st.binary(max_size=512))


# ------------------------------------------------------------------------------------------ RecordIO

_labels = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.lists(st.floats(width=32, min_value=-4, max_value=64), min_size=1, max_size=3),
)


@st.composite
def rec_files(draw: st.DrawFn) -> tuple[bytes, bytes, bytes]:
    """``(rec, idx, property)`` of a small valid rec: plain records, or the InsightFace layout
    (header record 0, images, identity records); payloads may hold the magic word (split records)."""
    insightface = draw(st.booleans())
    n = draw(st.integers(1, 5))
    payloads: list[tuple[int, bytes]] = []
    for key in range(1, n + 1):
        data = draw(st.one_of(st.binary(max_size=24), st.just(b"\0" * 4 + MAGIC_BYTES + b"\xff\xd8")))
        label = float(key - 1) if insightface else draw(_labels)
        payloads.append((key, pack(IRHeader(0, label, key, 0), data)))
    if insightface:
        first = n + 1
        payloads.insert(0, (0, pack(IRHeader(0, [first, first + n], 0, 0))))
        payloads += [(first + i, pack(IRHeader(0, [i + 1, i + 2], 0, 0))) for i in range(n)]
    for _ in range(draw(st.integers(0, 2))):  # an IRHeader field (flag, label, extra labels) set to an edge value
        j = draw(st.integers(0, len(payloads) - 1))
        at, word = draw(st.sampled_from([0, 4, 24, 28])), draw(st.sampled_from(_EDGE_WORDS)).to_bytes(4, "little")
        key, payload = payloads[j]
        if at + 4 <= len(payload):
            payloads[j] = (key, payload[:at] + word + payload[at + 4 :])
    rec, idx = bytearray(), []
    for key, payload in payloads:
        idx.append(f"{key}\t{len(rec)}\n")
        rec += encode_record(payload)
    prop = draw(st.sampled_from([b"", f"{n},112,112\n".encode(), b"3,112"]))
    return bytes(rec), "".join(idx).encode(), prop


@given(data=st.data(), files=rec_files())
@fuzz_settings(200)
def test_record_framing(data: st.DataObject, files: tuple[bytes, bytes, bytes]) -> None:
    """decode_record / unpack at every offset the .idx names, on mutated bytes."""
    rec = data.draw(mutated(files[0]))
    offsets = [int(line.split(b"\t")[1]) for line in files[1].splitlines()] + [data.draw(st.integers(0, 64))]
    for offset in offsets:
        out = holds(lambda o=offset: decode_record(rec, o))
        if isinstance(out, tuple):  # (payload, next offset), not a refusal
            holds(lambda p=out[0]: unpack(p))


def _read_everything(folder: Path) -> None:
    """Open the rec in ``folder`` and use every reader entry point a loader or command uses."""
    with RecordIOReader(folder / "train.rec") as r:
        _ = r.num_classes, r.num_images
        labels, bad = r.scan_labels()
        for i, key in enumerate(r.image_keys[:16]):
            try:
                exact = first_label(r.record(int(key))[0])
            except CorruptRecordError:
                assert int(key) in bad, f"key {int(key)}: the exact reader refuses it, the scan read label {labels[i]}"
                continue
            assert int(key) in bad or labels[i] == exact or (np.isnan(labels[i]) and np.isnan(exact)), (
                f"key {int(key)}: the vectorised scan read label {labels[i]}, the record says {exact}"
            )
        for key in r.keys[:16]:
            with contextlib.suppress(CorruptRecordError):
                r.record(int(key))
        r.check_labels()
        for _, keys in r.identities():
            assert len(keys) <= len(r.keys)


@given(data=st.data(), files=rec_files())
@fuzz_settings(60)
def test_recordio_reader(data: st.DataObject, files: tuple[bytes, bytes, bytes]) -> None:
    rec, idx, prop = files
    which = data.draw(st.sampled_from(["rec", "idx", "property", "all"]))
    if which in ("rec", "all"):
        rec = data.draw(mutated(rec))
    if which in ("idx", "all"):
        idx = data.draw(mutated(idx))
    if which in ("property", "all"):
        prop = data.draw(some_bytes(st.just(prop or b"1,112,112")))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "train.rec").write_bytes(rec)
        (folder / "train.idx").write_bytes(idx)
        if prop:
            (folder / "property").write_bytes(prop)
        holds(lambda: _read_everything(folder))


_idx_lines = st.lists(
    st.one_of(
        st.tuples(st.integers(-(2**70), 2**70), st.integers(-(2**70), 2**70)).map(lambda t: f"{t[0]}\t{t[1]}"),
        st.text(alphabet=string.digits + " \t-+.xe\r", max_size=24),
        st.text(max_size=16),
    ),
    max_size=8,
)


@given(files=rec_files(), lines=_idx_lines, sep=st.sampled_from(["\n", "\r\n", "\n\n"]))
@fuzz_settings(100)
def test_idx_parser(files: tuple[bytes, bytes, bytes], lines: list[str], sep: str) -> None:
    """Any .idx text beside a valid rec: the index is read or refused naming its line."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "train.rec").write_bytes(files[0])
        (folder / "train.idx").write_bytes(sep.join(lines).encode("utf-8", "surrogatepass"))
        holds(lambda: _read_everything(folder))


# ---------------------------------------------------------------------------------------------- .bin

_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True),
    st.binary(max_size=16),
    st.text(max_size=8),
    st.none(),
    st.sampled_from([np.float32(np.nan), np.int64(3), np.bool_(True), np.uint8(1)]),
    st.builds(np.frombuffer, st.binary(max_size=16), st.just(np.uint8)),
    st.builds(bytearray, st.binary(max_size=16)),
)
_pickled = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.lists(inner, max_size=6).map(tuple),
        st.dictionaries(st.text(max_size=4), inner, max_size=3),
    ),
    max_leaves=16,
)


@st.composite
def bin_files(draw: st.DrawFn) -> bytes:
    """A pickle of (images, issame) as the public files hold, or of any plain structure."""
    pairs = draw(st.integers(0, 3))
    images = draw(st.lists(st.binary(max_size=12), min_size=2 * pairs, max_size=2 * pairs))
    if draw(st.booleans()):
        images = [bytearray(b) for b in images]
    obj = draw(
        st.one_of(
            st.just((images, draw(st.lists(st.booleans(), min_size=pairs, max_size=pairs)))),
            st.tuples(st.just(images), _pickled),
            _pickled,
        )
    )
    return pickle.dumps(obj, protocol=draw(st.integers(0, pickle.HIGHEST_PROTOCOL)))


@given(data=some_bytes(bin_files()))
@fuzz_settings(300)
def test_bin_unpickler(data: bytes) -> None:
    holds_on_file(data, "x.bin", load_bin)


# --------------------------------------------------------------------------------------------- config

_KEYS = [
    f"{section}.{name}"
    for section in Config.__dataclass_fields__
    for name in getattr(Config(), section).__dataclass_fields__
]
_values = st.one_of(
    st.integers(-(2**80), 2**80),
    st.floats(allow_nan=True),
    st.booleans(),
    st.text(max_size=12),
    st.none(),
    st.lists(st.one_of(st.integers(-9, 9), st.floats(), st.text(max_size=3)), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@st.composite
def yaml_texts(draw: st.DrawFn) -> str:
    """A config file: real sections and keys with values of any type, written by yaml (so valid)."""
    import yaml

    tree: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(_KEYS), max_size=4)):
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = draw(_values)
    if draw(st.booleans()):
        tree[draw(st.text(max_size=6))] = draw(_values)
    return yaml.safe_dump(tree)


@given(data=st.data())
@fuzz_settings(200)
def test_yaml_config(data: st.DataObject) -> None:
    text = data.draw(
        st.one_of(
            yaml_texts(),
            yaml_texts().flatmap(lambda t: mutated(t.encode())).map(lambda b: b.decode("utf-8", "replace")),
            st.text(alphabet=st.sampled_from(list("{}[]:,&*!|>-?'\"# \n\tab1.0")), max_size=64),
            st.text(max_size=64),
        )
    )
    preset = data.draw(st.sampled_from(list(PRESETS)))
    holds_on_file(text.encode("utf-8", "surrogatepass"), "c.yaml", lambda path: load_config(preset, path))


_overrides = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(_KEYS), _values).map(lambda kv: f"{kv[0]}={kv[1]}"),
        st.tuples(st.sampled_from(_KEYS), st.text(max_size=12)).map(lambda kv: f"{kv[0]}={kv[1]}"),
        st.text(max_size=24),
    ),
    max_size=4,
)


@given(overrides=_overrides)
@fuzz_settings(300)
def test_overrides(overrides: list[str]) -> None:
    holds(lambda: load_config("small", None, overrides))


# ------------------------------------------------------------------------------------ landmark sidecar


@st.composite
def sidecar_files(draw: st.DrawFn) -> bytes:
    """An .npz as `lafs-fast data landmarks` writes it (stored or compressed), small."""
    n, p = draw(st.integers(0, 4)), draw(st.integers(0, 6))
    points = draw(st.lists(st.floats(width=32, allow_nan=True), min_size=n * p * 2, max_size=n * p * 2))
    arrays = {
        "keys": np.arange(n, dtype=np.int64),
        "points": np.asarray(points, dtype=np.float32).reshape(n, p, 2),
        "scores": np.ones(n, np.float32),
        "detector": np.array("blazeface"),
        "names": np.array([f"p{i}" for i in range(p)]),
    }
    for name in draw(st.lists(st.sampled_from(sorted(arrays)), max_size=2)):
        arrays.pop(name, None)
    buf = io.BytesIO()
    (np.savez_compressed if draw(st.booleans()) else np.savez)(buf, **arrays)
    return buf.getvalue()


def _use_sidecar(path: Path) -> None:
    side = LandmarkSidecar.load(path)
    _ = side.found
    with contextlib.suppress(ValueError):  # no face at all: refused in one sentence
        side.template()
    side.for_keys(side.keys[:3])


@given(data=some_bytes(sidecar_files()))
@fuzz_settings(120)
def test_landmark_sidecar(data: bytes) -> None:
    holds_on_file(data, "s.npz", _use_sidecar)


# ---------------------------------------------------------------------------------------- checkpoints


@st.composite
def checkpoint_files(draw: st.DrawFn) -> bytes:
    """A small torch.save file: tensors (shared storage, views) in dicts and lists."""
    a = torch.arange(draw(st.integers(0, 6))).to(draw(st.sampled_from([torch.float32, torch.int64, torch.bool])))
    obj = draw(
        st.sampled_from(
            [{"w": a}, {"w": a, "v": a[1:]}, [a, {"x": 1.5, "s": "t"}], {"format": "lafs-fast", "state_dict": {}}]
        )
    )
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@given(data=some_bytes(checkpoint_files()))
@fuzz_settings(120)
def test_checkpoint_loader(data: bytes) -> None:
    holds_on_file(data, "m.pt", safe_load)


def test_the_bounds_catch_what_they_promise(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness itself: a huge allocation, a hang and a message of several lines fail the property."""
    with pytest.raises(MemoryError):
        holds(lambda: bytearray(2 * EXTRA_BYTES))
    monkeypatch.setattr(f"{__name__}.SECONDS", 0.2)
    with pytest.raises(TimeoutError):
        holds(lambda: any(False for _ in iter(int, 1)))  # a loop that never ends, in constant memory
    with pytest.raises(AssertionError, match="several lines"):
        holds(lambda: (_ for _ in ()).throw(ValueError("one\ntwo")))
