"""Runs the reference's training scripts on the CPU, in one process, without MXNet (for
tests/test_reference_scripts.py).

``python -B tests/reference_scripts.py MODE SCRIPT OUT_JSON SIZES_JSON -- ARGS...`` executes the
reference's ``SCRIPT`` (``lafs_train.py`` or ``train_largescale.py``) from its folder, as published
(MODE ``reference``) or with only its ``from face_pre_pro.ViT_face import ...`` line pointed at
``lafs_fast.compat`` (MODE ``compat``), and writes every step's loss to OUT_JSON.

Nothing in the reference's folder is changed. What this file does instead, the same for both modes:

- CPU, one process: ``.cuda()`` / ``.to(rank)`` keep tensors and modules on the CPU; the process
  group is gloo with world size 1; DistributedDataParallel is :class:`SingleProcessDDP` (a wrapper
  with the same ``module.`` prefix, no gradient hooks); DataLoaders load in the main process;
  ``torch.hub.list`` (the stage-1 parser lists XCiT models from GitHub) returns nothing.
- Stand-ins for packages this environment lacks: MXNet (RecordIO + image decode: :mod:`mxnet` below,
  tested against the RecordIO lafs-fast writes), IPython / tensorboardX / ptflops (called for
  debugging, logging and a FLOP count only), and placeholders for sklearn / warmup_scheduler
  (imported, never called by these runs: an error if they are).
- Model sizes: the scripts hard-code ViT-B; SIZES_JSON overrides constructor keywords of
  ``ViT_face_landmark_patch8`` (both the reference's and compat's) to keep the run seconds long.
- One seed for torch / numpy / random before the script starts (``train_largescale.py`` seeds nothing).
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import sys
import types
from pathlib import Path

import numpy as np

REF_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "LAFS_CVPR2024"
REFERENCE_IMPORT = "from face_pre_pro.ViT_face import"
COMPAT_IMPORT = "from lafs_fast.compat import"
SEED = 1234

# ------------------------------------------------------------------------------ MXNet stand-in

_MAGIC = 0xCED7230A  # dmlc RecordIO record magic
_IR = struct.Struct("<IfQQ")  # mxnet.recordio IRHeader: flag, label, id, id2


class NDArray:
    """The few mxnet.nd.NDArray members the reference's loaders use (a numpy array inside)."""

    def __init__(self, a: np.ndarray) -> None:
        self._a = np.asarray(a)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._a.shape

    def asnumpy(self) -> np.ndarray:
        return self._a.copy()


class IRHeader(tuple):
    """mxnet.recordio.IRHeader: (flag, label, id, id2); label a float, or a float32 array when flag > 0."""

    def __new__(cls, flag: int, label, id: int, id2: int):  # noqa: A002 - mxnet's field name
        return super().__new__(cls, (flag, label, id, id2))

    flag = property(lambda self: self[0])
    label = property(lambda self: self[1])
    id = property(lambda self: self[2])
    id2 = property(lambda self: self[3])


def unpack(s: bytes) -> tuple[IRHeader, bytes]:
    """mxnet.recordio.unpack: the 24-byte header, ``flag`` extra float32 labels, then the data."""
    flag, label, id_, id2 = _IR.unpack_from(s, 0)
    s = s[_IR.size :]
    if flag > 0:
        label, s = np.frombuffer(s, dtype=np.float32, count=flag), s[4 * flag :]
    return IRHeader(flag, label, id_, id2), s


class MXIndexedRecordIO:
    """mxnet.recordio.MXIndexedRecordIO (read only): the ``.idx`` text index (``key\\toffset`` lines)
    and dmlc's record framing (magic, 29-bit length with a 3-bit continuation flag, 4-byte padding)."""

    def __init__(self, idx_path: str, uri: str, flag: str) -> None:
        if flag != "r":
            raise ValueError("the MXNet stand-in reads only")
        self.idx = {}
        for line in Path(idx_path).read_text().splitlines():
            key, offset = line.split("\t")
            self.idx[int(key)] = int(offset)
        self.keys = list(self.idx)
        self._data = Path(uri).read_bytes()

    def read_idx(self, idx: int) -> bytes:
        pos, parts = self.idx[idx], []
        while True:
            magic, lrec = struct.unpack_from("<II", self._data, pos)
            if magic != _MAGIC:
                raise ValueError(f"bad RecordIO magic at offset {pos}")
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            parts.append(self._data[pos + 8 : pos + 8 + length])
            pos += 8 + length + (-length % 4)
            if cflag in (0, 3):  # a whole record, or the last part of a split one
                return b"".join(parts)


def imdecode(buf: bytes, flag: int = 1, to_rgb: int = 1) -> NDArray:
    """mx.image.imdecode: (H, W, 3) uint8, RGB (its default ``to_rgb=1``)."""
    from PIL import Image

    img = Image.open(io.BytesIO(bytes(buf))).convert("RGB")
    a = np.asarray(img)
    return NDArray(a if to_rgb else a[..., ::-1])


def _resize_short(img: NDArray, size: int) -> NDArray:
    if min(img.shape[:2]) != size:
        raise NotImplementedError("the MXNet stand-in does not resize; write the .bin at 112 x 112")
    return img


def _mxnet() -> dict[str, types.ModuleType]:
    mx = types.ModuleType("mxnet")
    nd = types.ModuleType("mxnet.ndarray")
    nd.NDArray = NDArray
    nd.transpose = lambda data, axes: NDArray(np.transpose(data._a, axes))
    nd.flip = lambda data, axis: NDArray(np.flip(data._a, axis))
    image = types.ModuleType("mxnet.image")
    image.imdecode, image.resize_short = imdecode, _resize_short
    recordio = types.ModuleType("mxnet.recordio")
    recordio.IRHeader, recordio.unpack, recordio.MXIndexedRecordIO = IRHeader, unpack, MXIndexedRecordIO
    mxio = types.ModuleType("mxnet.io")
    mx.nd = mx.ndarray = nd
    mx.image, mx.recordio, mx.io = image, recordio, mxio
    return {"mxnet": mx, "mxnet.ndarray": nd, "mxnet.image": image, "mxnet.recordio": recordio, "mxnet.io": mxio}


# ------------------------------------------------------------------------ other stand-ins


def _placeholder(name: str) -> type:
    class Placeholder:
        def __init__(self, *a, **k) -> None:
            raise RuntimeError(f"{name} is a placeholder in tests/reference_scripts.py; this run must not call it")

    return Placeholder


def _other_modules() -> dict[str, types.ModuleType]:
    mods = {n: types.ModuleType(n) for n in ("IPython", "tensorboardX", "ptflops", "warmup_scheduler")}
    mods["IPython"].embed = lambda *a, **k: None
    mods["IPython"].get_ipython = lambda: None  # matplotlib asks whether it runs inside IPython
    mods["tensorboardX"].SummaryWriter = type("SummaryWriter", (), {"__init__": lambda s, *a, **k: None})
    mods["tensorboardX"].SummaryWriter.add_scalar = lambda s, *a, **k: None
    mods["ptflops"].get_model_complexity_info = lambda *a, **k: ("n/a", "n/a")  # printed only
    mods["warmup_scheduler"].GradualWarmupScheduler = _placeholder("warmup_scheduler.GradualWarmupScheduler")
    try:
        import sklearn  # noqa: F401 - the real one where installed
    except ImportError:
        for n in ("sklearn", "sklearn.model_selection", "sklearn.decomposition"):
            mods[n] = types.ModuleType(n)
        mods["sklearn.model_selection"].KFold = _placeholder("sklearn.model_selection.KFold")
        mods["sklearn.decomposition"].PCA = _placeholder("sklearn.decomposition.PCA")
    return mods


def install_stand_ins() -> None:
    """Put the MXNet stand-in into sys.modules, and the others where the real package is missing."""
    sys.modules.update(_mxnet())
    for name, mod in _other_modules().items():
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = mod


# ------------------------------------------------------------------------ CPU, one process


def _single_process_patches(store: Path) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn as nn

    class SingleProcessDDP(nn.Module):
        """DistributedDataParallel for one CPU process: the wrapped model under ``module``."""

        def __init__(self, module: nn.Module, *args, **kwargs) -> None:
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    to = nn.Module.to

    def cpu_to(self, *args, **kwargs):
        dev = args[0] if args else kwargs.get("device")
        if isinstance(dev, int) or (dev is not None and str(dev).startswith("cuda")):
            return self
        return to(self, *args, **kwargs)

    init_pg = dist.init_process_group
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    nn.Module.to = cpu_to
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.synchronize = lambda *a, **k: None
    nn.parallel.DistributedDataParallel = SingleProcessDDP
    torch.hub.list = lambda *a, **k: []
    dist.init_process_group = lambda *a, **k: init_pg("gloo", init_method=f"file://{store}", world_size=1, rank=0)
    loader_init = torch.utils.data.DataLoader.__init__

    def main_process_loader(self, *args, **kwargs):
        kwargs.update(num_workers=0, pin_memory=False)
        loader_init(self, *args, **kwargs)

    torch.utils.data.DataLoader.__init__ = main_process_loader


def _load_dataloader_web() -> None:
    """face_pre_pro.dataloader_web as published does not parse: a docstring indented 4 spaces inside
    a method body of 8. This run compiles it with those 3 lines moved to the body's indentation."""
    import importlib.util

    path = REF_DIR / "face_pre_pro" / "dataloader_web.py"
    lines = path.read_text().split("\n")
    at = [i for i, line in enumerate(lines) if line.startswith("    '''filepath_id_nidex")]
    for i in at[:1]:
        lines[i : i + 3] = ["    " + line for line in lines[i : i + 3]]
    spec = importlib.util.spec_from_loader("face_pre_pro.dataloader_web", loader=None, origin=str(path))
    mod = importlib.util.module_from_spec(spec)
    mod.__file__ = str(path)
    sys.modules[spec.name] = mod
    exec(compile("\n".join(lines), str(path), "exec"), mod.__dict__)  # noqa: S102 - the reference's own module


def _shrink(cls: type, sizes: dict) -> type:
    """``cls`` with some constructor keywords overridden (the scripts hard-code ViT-B)."""

    class Shrunk(cls):
        def __init__(self, **kwargs) -> None:
            super().__init__(**{**kwargs, **sizes})

    Shrunk.__name__ = Shrunk.__qualname__ = cls.__name__
    return Shrunk


def _record_losses(losses: list[float]) -> None:
    """Every step's loss, read where each script logs it (its own logger classes)."""
    import util.utils
    import utils

    update = utils.MetricLogger.update

    def metric_update(self, **kwargs):
        if "loss" in kwargs:
            losses.append(float(kwargs["loss"]))
        update(self, **kwargs)

    utils.MetricLogger.update = metric_update
    # its end-of-epoch reduce makes a CUDA tensor; with one process there is nothing to reduce
    utils.SmoothedValue.synchronize_between_processes = lambda self: None
    meter_update = util.utils.AverageMeter.update

    def average_update(self, val, n=1):
        losses.append(float(val))
        meter_update(self, val, n)

    util.utils.AverageMeter.update = average_update


def main(argv: list[str]) -> None:
    mode, script, out_json, sizes_json, _, *args = argv
    import lafs_fast.models  # noqa: F401 - makes torchvision importable on a CPU torch (see that module)

    sys.path.insert(0, str(REF_DIR))
    install_stand_ins()
    out = Path(out_json)
    _single_process_patches(out.with_suffix(".pg"))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    losses: list[float] = []
    _record_losses(losses)
    import face_pre_pro.ViT_face as reference

    _load_dataloader_web()
    import torch

    import lafs_fast.compat as compat

    sizes = json.loads(sizes_json)
    for mod in (reference, compat):
        mod.ViT_face_landmark_patch8 = _shrink(mod.ViT_face_landmark_patch8, sizes)
    source = (REF_DIR / script).read_text()
    if mode == "compat":
        if source.count(REFERENCE_IMPORT) != 1:
            raise RuntimeError(f"{script} no longer has exactly one `{REFERENCE_IMPORT}` line")
        source = source.replace(REFERENCE_IMPORT, COMPAT_IMPORT)
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    random.seed(SEED)
    sys.argv = [str(REF_DIR / script), *args]
    ns = {"__name__": "__main__", "__file__": str(REF_DIR / script)}
    exec(compile(source, str(REF_DIR / script), "exec"), ns)  # noqa: S102 - the reference's own script
    if "BACKBONE" in ns:  # train_largescale saves after an evaluation these runs are too short for:
        # write what its save line writes (one GPU, MULTI_GPU False: the DDP model's state dict)
        torch.save(ns["BACKBONE"].state_dict(), out.with_name("Backbone_VIT_land_8_checkpoint.pth"))
    out.write_text(json.dumps(losses))


if __name__ == "__main__":
    main(sys.argv[1:])
