"""No host sync inside a training step (the engine's design: the CPU queues step s + 1 while the
GPU runs step s, and reads the loss one step late).

A ``TorchDispatchMode`` records every operator that, on a GPU, makes the host wait for the device
or for a blocking copy: ``aten._local_scalar_dense`` (every ``.item()`` / ``float()`` / ``int()`` /
``bool()`` of a tensor), data-dependent shapes (``nonzero``, indexing with a boolean mask (nonzero
inside), ``masked_select``, ``unique``), tensors made from Python data (``torch.tensor`` /
``torch.as_tensor`` of a list or number: on a GPU a blocking copy from pageable memory) and copies
from the CPU to another device. (``x[i] = 1.0`` is fine: a CUDA tensor takes the scalar by value.)

It wraps one DINO step (views -> teacher / student -> loss -> backward, then gradient clipping and
the EMA teacher; the optimiser is fused on CUDA) and one supervised (fine-tuning) step's forward
and backward, with the code a GPU runs: the Triton views and sampler (the interpreter here) and the
device augmentation. On the CPU these operators cost nothing; the test names the ones that would
stall a GPU.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lafs_fast import dispatch
from lafs_fast.config import load_config
from lafs_fast.data import SyntheticFaces
from lafs_fast.launch import DistInfo
from lafs_fast.train import supervised_run
from lafs_fast.train.dino import DinoStage
from lafs_fast.train.engine import StepContext, clip_gradients
from lafs_fast.train.supervised import SupervisedStage
from lafs_fast.train.supervised_model import build_supervised_model
from tests import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")

aten = torch.ops.aten
_SYNC_OPS = {
    aten._local_scalar_dense,
    aten.nonzero,
    aten.nonzero_static,
    aten.masked_select,
    aten.unique_dim,
    aten._unique2,
    aten.unique_consecutive,
    aten.item,
}
_COPIES = {aten._to_copy, aten.copy_}
_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}  # a boolean index runs nonzero inside


def _where() -> str:
    """The innermost project frame that issued the operator."""
    frames = [f for f in traceback.extract_stack() if "lafs_fast" in f.filename or "/kernels/" in f.filename]
    return f"{frames[-1].filename.split('/')[-1]}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"


class HostSyncs(TorchDispatchMode):
    """Records (operator, where) for every host sync or host-to-device copy issued inside."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []

    def __enter__(self):
        # torch.tensor is a factory, not an operator: the mode sees only its aten.lift_fresh, which
        # ``x[i] = 1.0`` issues too; wrap the Python entry points instead
        self._saved = torch.tensor, torch.as_tensor
        for name, fn in zip(("tensor", "as_tensor"), self._saved):
            setattr(torch, name, self._from_python(name, fn))
        return super().__enter__()

    def __exit__(self, *exc):
        torch.tensor, torch.as_tensor = self._saved
        return super().__exit__(*exc)

    def _from_python(self, name, fn):
        def wrapped(data, *args, **kwargs):
            if not isinstance(data, torch.Tensor):
                self.found.append((f"torch.{name}(python data)", _where()))
            return fn(data, *args, **kwargs)

        return wrapped

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _SYNC_OPS:
            self.found.append((str(func), _where()))
        elif packet in _INDEXING and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]
        ):
            self.found.append((f"{func} with a boolean mask", _where()))
        elif packet in _COPIES:
            src = args[1] if packet is aten.copy_ else args[0]
            dst = args[0].device if packet is aten.copy_ else kwargs.get("device") or src.device
            if isinstance(src, torch.Tensor) and src.device.type == "cpu" and torch.device(dst).type != "cpu":
                self.found.append((f"{func} cpu -> {dst}", _where()))
        return func(*args, **kwargs)


@pytest.fixture
def gpu_dispatch(monkeypatch):
    """``auto`` picks the Triton kernels as on CUDA (run by the interpreter on CPU tensors)."""
    resolve = dispatch.resolve_triton_backend

    def as_on_cuda(backend, device, entry, kind, twin):
        return resolve(backend, torch.device("cuda") if backend == "auto" else device, entry, kind, twin)

    for mod in ("lafs_fast.augment", "lafs_fast.sampling"):
        monkeypatch.setattr(f"{mod}.resolve_triton_backend", as_on_cuda)


def _ctx(values: dict[str, float]) -> StepContext:
    return StepContext(0, 0, 0, 123_456_789_012_345, {"lr": 1e-3, "weight_decay": 0.04, **values}, DistInfo())


# Small views (32 px, 4 x 4 landmarks) keep the interpreted kernels quick; the code path is the
# reference one (landmarks, perturbation, the shuffle of the local views).
DINO = [
    *TINY_MODEL,
    "model.image_size=32",
    "model.num_patches=16",
    "views.global_tokens=16",
    "views.local_tokens=4",
    "views.n_local=2",
    "dino.out_dim=64",
    "dino.hidden_dim=64",
    "dino.bottleneck_dim=16",
    "optim.batch_size=2",
]


@pytest.mark.parametrize(
    "pack, recipe",
    [(False, []), (True, []), (False, ["dino.centering=sinkhorn", "dino.koleo_weight=1"])],
    ids=["dino", "dino-packed", "sinkhorn-koleo"],
)
def test_a_dino_step_has_no_host_sync(pack, recipe, gpu_dispatch):
    cfg = load_config("small", None, [*DINO, f"views.pack={str(pack).lower()}", *recipe])
    stage = DinoStage(cfg, torch.device("cpu"))
    images = SyntheticFaces(2, 1, seed=3).batch(range(2))[0]
    params = [p for p in stage.model.parameters() if p.requires_grad]
    for _ in range(2):  # the second step runs with every per-device constant already built
        with HostSyncs() as mode:
            loss, _ = stage.forward_loss(stage.model, (images, torch.zeros(2)), _ctx({"teacher_temp": 0.04}))
            loss.backward()
            # the engine's per-step work around the optimiser (which is fused on CUDA): clipping, EMA
            clip_gradients(params, 3.0)
            stage.after_optimizer_step(stage.model, _ctx({"teacher_momentum": 0.996}))
    assert stage.views.landmarks is not None and torch.isfinite(loss)
    assert mode.found == [], "host syncs in a DINO step:\n" + "\n".join(f"{op} at {where}" for op, where in mode.found)


def test_a_supervised_step_has_no_host_sync(tmp_path, gpu_dispatch):
    cfg = load_config(
        "small",
        None,
        [
            *TINY_MODEL,
            "optim.batch_size=2",
            f"train.out_dir={tmp_path}",
            "finetune.randaug_p=1.0",
            "finetune.erase_p=1.0",
        ],
        defaults=supervised_run.stage_defaults("small"),
    )
    _, model, _ = build_supervised_model(cfg, 4, 2)
    stage = SupervisedStage(cfg, model, 4, 2, torch.device("cpu"), ref_landmarks=model.landmark_cnn, augment="gpu")
    images, labels = SyntheticFaces(2, 1, seed=3).batch(range(2))
    for _ in range(2):
        with HostSyncs() as mode:
            loss, _ = stage.forward_loss(stage.model, (images, labels), _ctx({"landmark_lambda": 1.0}))
            loss.backward()
    assert torch.isfinite(loss)
    assert mode.found == [], "host syncs in a supervised step:\n" + "\n".join(
        f"{op} at {where}" for op, where in mode.found
    )
