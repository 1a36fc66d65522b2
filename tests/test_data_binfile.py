"""The .bin reader: round trip, Python 2 files, numpy payloads, and refusal of code-running pickles."""

import os
import pickle
import subprocess
import time

import numpy as np
import pytest

from lafs_fast.data.binfile import UnsafePickleError, load_bin, write_bin


class _RunsCommand:
    """Pickles to ``os.system(cmd)``: what a crafted .bin does on ``pickle.load``."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _RunsPopen(_RunsCommand):
    def __reduce__(self):
        return (subprocess.Popen, (["touch", self.cmd],))


def test_round_trip(tmp_path):
    images = [b"\xff\xd8a", b"\xff\xd8b", b"\xff\xd8c", b"\xff\xd8d"]
    write_bin(tmp_path / "x.bin", images, [True, False])
    bs = load_bin(tmp_path / "x.bin")
    assert bs.name == "x" and bs.images == images and bs.issame.tolist() == [True, False] and bs.num_pairs == 2


def test_python2_file_with_str_payloads(tmp_path):
    # Protocol 2 as Python 2 wrote it: ([str 'abc', str 'de'], [True]) with SHORT_BINSTRING opcodes.
    raw = b"\x80\x02]q\x00(U\x03abcU\x02dee]q\x01\x88a\x86q\x02."
    (tmp_path / "py2.bin").write_bytes(raw)
    bs = load_bin(tmp_path / "py2.bin")
    assert bs.images == [b"abc", b"de"] and bs.issame.tolist() == [True]


def test_python3_protocol2_and_numpy_payloads_load(tmp_path):
    # protocol 2 writes bytes through _codecs.encode; numpy arrays through _reconstruct
    obj = ([b"ab", b"cd", np.frombuffer(b"ef", np.uint8), b"gh"], np.array([True, False]))
    (tmp_path / "np.bin").write_bytes(pickle.dumps(obj, protocol=2))
    bs = load_bin(tmp_path / "np.bin")
    assert bs.images == [b"ab", b"cd", b"ef", b"gh"] and bs.issame.tolist() == [True, False]


@pytest.mark.parametrize("payload", [_RunsCommand, _RunsPopen])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path, payload, protocol):
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}" if payload is _RunsCommand else str(marker)
    evil = pickle.dumps(([payload(cmd), b"x"], [True]), protocol=protocol)
    (tmp_path / "evil.bin").write_bytes(evil)
    with pytest.raises(UnsafePickleError, match="refusing to load"):
        load_bin(tmp_path / "evil.bin")
    assert not marker.exists()
    pickle.loads(evil)  # the unrestricted loader runs the command ...
    for _ in range(100):  # Popen runs asynchronously
        if marker.exists():
            break
        time.sleep(0.02)
    assert marker.exists()  # ... so the refusal above is what kept it from running


def test_damaged_files_give_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bin(tmp_path / "missing.bin")
    (tmp_path / "trunc.bin").write_bytes(pickle.dumps(([b"a", b"b"], [True]))[:-5])
    with pytest.raises(ValueError, match="not a readable verification .bin"):
        load_bin(tmp_path / "trunc.bin")
    (tmp_path / "odd.bin").write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True])))
    with pytest.raises(ValueError, match="need exactly 2 per pair"):
        load_bin(tmp_path / "odd.bin")
    for name, issame in (("nan", [float("nan")]), ("two", [2]), ("word", ["yes"])):  # NaN became True
        (tmp_path / f"{name}.bin").write_bytes(pickle.dumps(([b"a", b"b"], issame)))
        with pytest.raises(ValueError, match="values other than true / false"):
            load_bin(tmp_path / f"{name}.bin")
    (tmp_path / "ints.bin").write_bytes(pickle.dumps(([b"a", b"b", b"c", b"d"], np.array([1, 0]))))
    assert load_bin(tmp_path / "ints.bin").issame.tolist() == [True, False]
    (tmp_path / "dict.bin").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="does not hold"):
        load_bin(tmp_path / "dict.bin")
    with pytest.raises(ValueError, match="2 images per pair"):
        write_bin(tmp_path / "w.bin", [b"a"], [True])


def _crafted(calls: bytes) -> bytes:
    """A protocol-2 pickle of ``([<calls>, b"x"], [True])``: ``calls`` builds the first image."""
    return b"\x80\x02](" + calls + b"C\x01xe]\x88a\x86."


@pytest.mark.parametrize(
    "name,calls",
    [
        ("bytes", b"cbuiltins\nbytes\nJ\x00\xca\x9a;\x85R"),  # bytes(1_000_000_000)
        ("bytearray", b"c__builtin__\nbytearray\nJ\x00\xca\x9a;\x85R"),
        (
            "array",
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\xca\x9a;\x85C\x01b\x87R",
        ),  # _reconstruct(ndarray, (1e9,), 'b')
    ],
)
def test_small_bin_cannot_make_eval_allocate_a_gigabyte(tmp_path, name, calls):
    """A 48-byte .bin asking an allow-listed constructor for 1 GB: refused in one sentence before the
    allocation (it allocated 1 GB, then failed on the type), the peak stays small."""
    import tracemalloc

    raw = _crafted(calls)
    assert len(raw) < 100
    (tmp_path / "big.bin").write_bytes(raw)
    tracemalloc.start()
    try:
        with pytest.raises(
            UnsafePickleError,
            match=r"big\.bin: refusing to build .* of 1000000000 bytes: "
            r"the pickle would allocate more than the \d+ bytes its own size allows",
        ) as e:
            load_bin(tmp_path / "big.bin")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000 and "\n" not in str(e.value)


def test_object_arrays_are_refused(tmp_path):
    """numpy's object-array unpickling can crash the process on a crafted state: refused outright."""
    obj = ([np.array([b"ab", b"cd"], dtype=object), b"x"], [True])
    (tmp_path / "obj.bin").write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(UnsafePickleError, match="array of Python objects"):
        load_bin(tmp_path / "obj.bin")
