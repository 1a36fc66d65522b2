"""Reference checkpoints in and out, and lafs-fast's own model file.

Reference formats (docs/method.md section 8):
- Part fViT: one flat state dict (``cls_token``, ``transformer.layers.N...``, ``stn.features...``,
  ``output_layer.1...``, ``loss.weight``), possibly under ``module.`` (DataParallel);
- LAFS SSL: ``{"student": sd, "teacher": sd, ...}`` whose keys carry ``module.`` and/or
  ``backbone.`` prefixes, with the DINO head under ``head.``; fine-tuning reads the teacher.

lafs-fast model file (what ``lafs-fast checkpoint import`` writes and ``load_model`` reads)::

    {"format": "lafs-fast-model", "version": 1, "source": str, "model": {ModelConfig fields},
     "num_classes": int | None, "dino_out_dim": int | None,
     "backbone": sd, "landmark_cnn": sd | None, "margin_head": sd | None, "dino_head": sd | None,
     "margin_head_kind": "CosFace" | "ArcFace" | "SoftmaxHead" | None (absent in older files)}

Every load uses ``torch.load(weights_only=True)``; missing, unexpected or mis-shaped keys are
reported together in one ValueError, and a NaN or infinite weight is refused naming its tensor (a
model with one would embed every face as NaN and score 50 % without a word).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lafs_fast.config import ModelConfig
from lafs_fast.io import atomic_save, safe_load
from lafs_fast.models.fvit import FViT
from lafs_fast.models.heads import DINOHead, MarginHead
from lafs_fast.models.landmark_cnn import LandmarkCNN
from lafs_fast.models.part_fvit import PartFViT, build_backbone, build_landmark_cnn, build_margin_head

__all__ = [
    "TRAIN_FORMAT",
    "model_from_object",
    "load_model_and_kind",
    "FORMAT",
    "detect_format",
    "split_reference",
    "infer_model_config",
    "load_into",
    "check_finite",
    "import_checkpoint",
    "export_reference",
    "reference_backbone",
    "load_model",
    "model_file",
    "read_model_file",
]

FORMAT = "lafs-fast-model"
_LANDMARK_PREFIXES = ("stn.", "output_layer.")
# Keys the LAFS reference keeps in its modules but never uses in the forward pass.
_UNUSED_REFERENCE = ("mask_token", "global_token.")


def _strip(sd: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


def _is_state_dict(sd: Any) -> bool:
    return isinstance(sd, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())


def model_config_of(model: Any) -> ModelConfig:
    """The ``model`` entry of a lafs-fast model file as a ModelConfig, checked as a config is
    (:func:`lafs_fast.config.config_from_dict`: types, ranges, cross-field rules; ValueError naming the
    key) instead of a KeyError or TypeError later."""
    from lafs_fast.config import config_from_dict

    if not isinstance(model, dict) or not all(isinstance(k, str) for k in model):
        raise ValueError("malformed lafs-fast model file: its 'model' entry is not a mapping of model.* settings")
    try:
        return config_from_dict({"model": model}).model
    except ValueError as exc:
        raise ValueError(f"malformed lafs-fast model file: {exc}") from None


def check_model_file(obj: dict[str, Any]) -> None:
    """The structure of a lafs-fast model file (a file of another origin or a damaged one): ValueError
    naming the entry that is wrong."""
    model_config_of(obj.get("model"))
    for part in ("backbone", "landmark_cnn", "margin_head", "dino_head"):
        sd = obj.get(part)
        if (sd is not None or part == "backbone") and not _is_state_dict(sd):
            raise ValueError(f"malformed lafs-fast model file: its {part!r} entry is not a state dict of tensors")
    w = (obj.get("margin_head") or {}).get("weight")
    if obj.get("margin_head") is not None and (w is None or w.ndim != 2):
        raise ValueError("malformed lafs-fast model file: its margin head has no (classes, dim) 'weight'")
    dino = obj.get("dino_head")
    if dino is not None and not {"mlp.0.weight", "last_layer.weight_v"} <= set(dino):
        raise ValueError("malformed lafs-fast model file: its DINO head lacks 'mlp.0.weight' or 'last_layer.weight_v'")


def detect_format(obj: Any) -> str:
    """'lafs-fast', 'reference-ssl' or 'reference-part-fvit' (ValueError otherwise, also for a lafs-fast
    model file whose entries are malformed)."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        check_model_file(obj)
        return "lafs-fast"
    if (
        isinstance(obj, dict)
        and ("teacher" in obj or "student" in obj)
        and _is_state_dict(obj.get("teacher", obj.get("student")))
    ):
        return "reference-ssl"
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = _strip(obj, ("module.",))
        if "cls_token" in keys and "pos_embedding" in keys:
            return "reference-part-fvit"
    raise ValueError(
        "not a recognised checkpoint: expected a reference Part fViT state dict, a LAFS SSL "
        "checkpoint (student/teacher) or a lafs-fast model file"
    )


def split_reference(obj: Any, which: str = "teacher") -> dict[str, Any]:
    """Reference checkpoint -> {"backbone", "landmark_cnn", "margin_head", "dino_head", "ignored"}."""
    kind = detect_format(obj)
    if kind == "reference-ssl":
        if which not in obj:
            raise ValueError(
                f"the SSL checkpoint has no {which!r} weights (it has: "
                f"{', '.join(k for k in obj if isinstance(obj[k], dict))})"
            )
        flat = _strip(obj[which], ("module.",))
    elif kind == "reference-part-fvit":
        flat = _strip(obj, ("module.",))
    else:
        raise ValueError("split_reference takes a reference checkpoint; this is a lafs-fast model file")
    parts: dict[str, Any] = {"backbone": {}, "landmark_cnn": {}, "margin_head": {}, "dino_head": {}, "ignored": []}
    for k, v in flat.items():
        if k.startswith("head."):
            parts["dino_head"][k[5:]] = v
            continue
        k = _strip({k: v}, ("backbone.",)).popitem()[0]
        if k.startswith(_LANDMARK_PREFIXES):
            parts["landmark_cnn"][k] = v
        elif k.startswith("loss."):
            parts["margin_head"][k[5:]] = v
        elif k.startswith(_UNUSED_REFERENCE):
            parts["ignored"].append(k)
        else:
            parts["backbone"][k] = v
    for name in ("landmark_cnn", "margin_head", "dino_head"):
        parts[name] = parts[name] or None
    return parts


def infer_model_config(backbone_sd: dict[str, torch.Tensor], head_dim: int = 64) -> ModelConfig:
    """Sizes of a backbone from its tensors; the reference's attention scale (dim**-0.5)."""
    try:
        dim = backbone_sd["cls_token"].shape[-1]
        num_patches = backbone_sd["pos_embedding"].shape[1] - 1
        token_dim = backbone_sd["patch_to_embedding.weight"].shape[1]
        depth = 1 + max(int(k.split(".")[2]) for k in backbone_sd if k.startswith("transformer.layers."))
        inner = backbone_sd["transformer.layers.0.0.fn.fn.to_qkv.weight"].shape[0] // 3
        mlp_dim = backbone_sd["transformer.layers.0.1.fn.fn.net.0.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as exc:  # IndexError: a tensor of too few dimensions
        raise ValueError(f"checkpoint from another architecture: no fViT backbone tensor {exc}") from None
    if inner % head_dim:
        raise ValueError(f"attention width {inner} is not a multiple of head_dim {head_dim}: pass the right --head-dim")
    patch = int(round((token_dim / 3) ** 0.5))
    return ModelConfig(
        dim=dim,
        depth=depth,
        heads=inner // head_dim,
        head_dim=head_dim,
        mlp_dim=mlp_dim,
        num_patches=num_patches,
        patch_size=patch,
        attn_scale="dim",
    )


def _as_stored(t: torch.Tensor) -> torch.Tensor:
    """``t``, or the elements of its storage when ``t`` claims more elements than its storage holds (a
    stride-0 view of a huge shape over a few bytes, which a crafted file can hold: checking it as
    viewed would allocate its full size)."""
    stored = t.untyped_storage().nbytes() // max(t.element_size(), 1)
    if t.numel() <= stored:
        return t
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())


def check_finite(tensors: Any, what: str, prefix: str = "") -> None:
    """ValueError naming the first floating-point tensor of ``tensors`` (a tensor, or dicts / lists of
    them at any depth, e.g. a state dict or a whole checkpoint) that holds a NaN or an infinity."""
    if isinstance(tensors, torch.Tensor):
        if tensors.is_floating_point():
            bad = int((~torch.isfinite(_as_stored(tensors))).sum())
            if bad:
                raise ValueError(
                    f"{what}: tensor {prefix or '(top level)'} holds {bad} NaN or infinite value(s) of "
                    f"{tensors.numel()}; the file is damaged or came from a diverged run, use an earlier checkpoint"
                )
    elif isinstance(tensors, dict):
        for k, v in tensors.items():
            check_finite(v, what, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tensors, (list, tuple)):
        for i, v in enumerate(tensors):
            check_finite(v, what, f"{prefix}[{i}]")


def load_into(module: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Strict load with one readable message listing every missing / unexpected / mis-shaped key;
    a non-finite weight is refused naming its tensor (:func:`check_finite`)."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:

        def cut(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")

        bits = []
        if missing:
            bits.append(f"missing {len(missing)}: {cut(missing)}")
        if unexpected:
            bits.append(f"unexpected {len(unexpected)}: {cut(unexpected)}")
        if shapes:
            bits.append(f"shape mismatch {len(shapes)}: {cut(shapes)}")
        raise ValueError(f"{what} does not match this architecture: " + "; ".join(bits))
    check_finite(sd, what)
    module.load_state_dict(sd, strict=True)


def model_file(
    model_cfg: ModelConfig,
    backbone: FViT,
    landmark_cnn: LandmarkCNN | None = None,
    margin_head: MarginHead | None = None,
    dino_head: DINOHead | None = None,
    source: str = "lafs-fast",
) -> dict[str, Any]:
    """The lafs-fast model-file dict for these modules (tensors on the CPU)."""

    def sd(m: nn.Module | None):
        return None if m is None else {k: v.detach().cpu() for k, v in m.state_dict().items()}

    return {
        "format": FORMAT,
        "version": 1,
        "source": source,
        "model": dataclasses.asdict(model_cfg),
        "num_classes": None if margin_head is None else margin_head.num_classes,
        "dino_out_dim": None if dino_head is None else dino_head.last_layer.weight_v.shape[0],
        "backbone": sd(backbone),
        "landmark_cnn": sd(landmark_cnn),
        "margin_head": sd(margin_head),
        "margin_head_kind": None if margin_head is None else type(margin_head).__name__,
        "dino_head": sd(dino_head),
    }


def read_model_file(path: str | Path) -> dict[str, Any]:
    obj = safe_load(path)
    if detect_format(obj) != "lafs-fast":
        raise ValueError(
            f"{path} is a reference checkpoint: convert it first with `lafs-fast checkpoint import {path} OUT`"
        )
    return obj


def _dino_head_from_sd(sd: dict[str, torch.Tensor]) -> DINOHead:
    head = DINOHead(
        sd["mlp.0.weight"].shape[1],
        sd["last_layer.weight_v"].shape[0],
        sd["mlp.0.weight"].shape[0],
        sd["last_layer.weight_v"].shape[1],
    )
    load_into(head, sd, "DINO head")
    return head


def import_checkpoint(src: str | Path, dst: str | Path, which: str = "teacher", head_dim: int = 64) -> dict[str, Any]:
    """Convert a reference checkpoint into a lafs-fast model file; returns a summary dict."""
    obj = safe_load(src)
    kind = detect_format(obj)
    if kind == "lafs-fast":
        raise ValueError(f"{src} is already a lafs-fast model file")
    parts = split_reference(obj, which)
    mcfg = infer_model_config(parts["backbone"], head_dim)
    backbone = build_backbone(mcfg)
    load_into(backbone, parts["backbone"], f"{src}: backbone")
    landmark = margin = dino = None
    if parts["landmark_cnn"] is not None:
        landmark = build_landmark_cnn(mcfg)
        load_into(landmark, parts["landmark_cnn"], f"{src}: landmark CNN")
    if parts["margin_head"] is not None:
        w = parts["margin_head"]["weight"]
        margin = build_margin_head("cosface", w.shape[1], w.shape[0])
        load_into(margin, parts["margin_head"], f"{src}: margin head")
    if parts["dino_head"] is not None:
        dino = _dino_head_from_sd(parts["dino_head"])
    atomic_save(model_file(mcfg, backbone, landmark, margin, dino, source=kind), dst)
    return {
        "source": kind,
        "which": which if kind == "reference-ssl" else None,
        "dim": mcfg.dim,
        "depth": mcfg.depth,
        "heads": mcfg.heads,
        "landmark_cnn": landmark is not None,
        "num_classes": None if margin is None else margin.num_classes,
        "dino_head": dino is not None,
        "ignored": parts["ignored"],
    }


def reference_backbone(model: dict[str, Any], backbone: dict[str, torch.Tensor], landmarks: bool) -> dict:
    """The backbone state dict as the reference's class computes with it, or a ValueError naming the
    setting it cannot express. ``model``: the model file's ModelConfig fields.

    - ``attn_scale="head_dim"`` (the small preset) is folded exactly into the weights: the q rows of
      every ``to_qkv`` times sqrt(dim / head_dim), so the reference's dim**-0.5 gives the same scores;
    - a LayerNorm eps other than 1e-5, a timm landmark CNN, and a landmark model whose image size or
      landmark count the reference's hard-coded 0..111 scaling and ``keep_num`` rule would change, are
      refused;
    - training-only settings (dropout, drop-path, token_init_std, landmark_start) and head_dim (the
      reference's ``dim_head`` keyword) need nothing here.
    """
    model = {**dataclasses.asdict(ModelConfig()), **model}  # a file from before a field existed: its default
    if model["ln_eps"] != 1e-5:
        raise ValueError(
            f"cannot export: the model's LayerNorm eps is {model['ln_eps']:g} and the reference's nn.LayerNorm "
            "uses 1e-5; export a model trained with model.ln_eps=1e-5"
        )
    if landmarks and model["landmark_cnn"] != "mobilenetv3":
        raise ValueError(
            f"cannot export: the landmark CNN is {model['landmark_cnn']!r} and the reference's is its MobileNetV3 "
            "layout; export a model trained with model.landmark_cnn=mobilenetv3"
        )
    p, n = model["patch_size"], model["num_patches"]
    if landmarks and (model["image_size"] != 112 or (n not in (144, 196) and n != (112 // p) ** 2)):
        raise ValueError(
            f"cannot export: the reference scales landmarks to 0..111 and samples (112 // P)**2 of them, which "
            f"does not fit image_size {model['image_size']} with {n} landmarks of {p} px; export a 112-px model"
        )
    if model["attn_scale"] == "dim":
        return dict(backbone)
    fold = (model["dim"] / model["head_dim"]) ** 0.5  # head_dim**-0.5 == dim**-0.5 * fold
    inner = model["heads"] * model["head_dim"]
    out = dict(backbone)
    for k, w in backbone.items():
        if k.endswith(".to_qkv.weight"):
            out[k] = torch.cat([w[:inner] * fold, w[inner:]])
    return out


def export_reference(src: str | Path, dst: str | Path, fmt: str = "part_fvit") -> None:
    """lafs-fast model file -> reference layout: 'part_fvit' (flat state dict) or 'ssl' (teacher dict
    with ``backbone.`` / ``head.`` prefixes, the part the reference's fine-tuning reads). Settings the
    reference cannot express are converted exactly or refused (:func:`reference_backbone`)."""
    f = read_model_file(src)
    if fmt not in ("part_fvit", "ssl"):
        raise ValueError(f"unknown export format {fmt!r}; choose part_fvit or ssl")
    try:
        backbone = reference_backbone(f["model"], f["backbone"], f["landmark_cnn"] is not None)
    except ValueError as exc:
        raise ValueError(f"{src}: {exc}") from None
    if fmt == "part_fvit" and f["margin_head"] is not None and f.get("margin_head_kind") == "SoftmaxHead":
        raise ValueError(
            f"cannot export {src} as part_fvit: its margin head is a plain softmax classifier (the small preset's), "
            "which the reference would read as CosFace / ArcFace centres; export with --format ssl (no margin head)"
        )
    if fmt == "part_fvit":
        out = backbone
        if f["landmark_cnn"] is not None:
            out.update(f["landmark_cnn"])
        if f["margin_head"] is not None:
            out.update({f"loss.{k}": v for k, v in f["margin_head"].items()})
    else:
        teacher = {f"backbone.{k}": v for k, v in backbone.items()}
        if f["landmark_cnn"] is not None:
            teacher.update({f"backbone.{k}": v for k, v in f["landmark_cnn"].items()})
        if f["dino_head"] is not None:
            teacher.update({f"head.{k}": v for k, v in f["dino_head"].items()})
        out = {"teacher": teacher}
    atomic_save(out, dst)


TRAIN_FORMAT = "lafs-fast-train"  # the training checkpoints of lafs_fast.train.checkpointing (defined once, here)


def model_from_object(obj: Any, what: str, head_dim: int = 64, margin_head: bool = True) -> tuple[PartFViT | FViT, str]:
    """(eval-mode CPU model, kind) from any loaded checkpoint object: a lafs-fast model file, a lafs-fast
    TRAINING checkpoint (its ``model_file``), a reference Part fViT state dict or LAFS SSL checkpoint
    (its teacher, converted in memory). PartFViT when it holds a landmark CNN (with its margin head
    when ``margin_head`` and the file has one), else the bare FViT. ``what`` names it in errors;
    ``head_dim``: attention head width of a reference checkpoint (its tensors do not record it).
    kind: 'lafs-fast', 'training checkpoint', 'reference-part-fvit' or 'reference-ssl'."""
    kind = "training checkpoint" if isinstance(obj, dict) and obj.get("format") == TRAIN_FORMAT else None
    if kind:
        if not isinstance(obj.get("model_file"), dict):
            raise ValueError(
                f"{what} is a training checkpoint without a model file; use the run's exported model instead"
            )
        obj = obj["model_file"]
    fmt = detect_format(obj)
    kind = kind or fmt
    if fmt != "lafs-fast":
        parts = split_reference(obj)
        obj = {"model": dataclasses.asdict(infer_model_config(parts["backbone"], head_dim)), **parts}
    mcfg = model_config_of(obj["model"])
    backbone = build_backbone(mcfg)
    load_into(backbone, obj["backbone"], f"{what}: backbone")
    if obj.get("landmark_cnn") is None:
        return backbone.eval(), kind
    landmark = build_landmark_cnn(mcfg)
    load_into(landmark, obj["landmark_cnn"], f"{what}: landmark CNN")
    head = None
    if margin_head and obj.get("margin_head") is not None:
        w = obj["margin_head"]["weight"]
        head = build_margin_head("cosface", w.shape[1], w.shape[0])
        load_into(head, obj["margin_head"], f"{what}: margin head")
    return PartFViT(landmark, backbone, head).eval(), kind


def load_model_and_kind(path: str | Path, head_dim: int = 64, margin_head: bool = True) -> tuple[PartFViT | FViT, str]:
    """:func:`model_from_object` of the file ``path``; errors name the file and the fix."""
    try:
        return model_from_object(safe_load(path), str(path), head_dim, margin_head)
    except ValueError as exc:
        raise named(path, exc) from None


def named(path: str | Path, exc: ValueError) -> ValueError:
    """``exc``'s sentence about a loaded object, naming the file ``path`` it came from."""
    msg = str(exc)
    if str(path) in msg:
        return exc
    if msg.startswith(("not a recognised checkpoint", "malformed")):
        return ValueError(f"{path} is {'a ' if msg.startswith('malformed') else ''}{msg}")
    return ValueError(f"{path}: {msg}")


def load_model(path: str | Path, num_classes_head: bool = True) -> PartFViT | FViT:
    """A ready model (eval mode, CPU) from any checkpoint lafs-fast reads (:func:`model_from_object`)."""
    return load_model_and_kind(path, margin_head=num_classes_head)[0]


# ---------------------------------------------------------------- CLI: lafs-fast checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    imp = sub.add_parser("import", help="reference Part fViT / LAFS SSL checkpoint -> lafs-fast model file")
    imp.add_argument("src")
    imp.add_argument("dst")
    imp.add_argument(
        "--which", default="teacher", choices=["teacher", "student"], help="SSL weights to take (default: teacher)"
    )
    imp.add_argument("--head-dim", type=int, default=64, help="attention head width (reference: 64)")
    exp = sub.add_parser("export", help="lafs-fast model file -> reference layout")
    exp.add_argument("src")
    exp.add_argument("dst")
    exp.add_argument("--format", default="part_fvit", choices=["part_fvit", "ssl"])
    show = sub.add_parser("show", help="summarise a checkpoint")
    show.add_argument("src")


def run(args: argparse.Namespace) -> int:
    if args.action == "import":
        s = import_checkpoint(args.src, args.dst, args.which, args.head_dim)
        print(f"imported {s['source']} ({'weights: ' + s['which'] if s['which'] else 'state dict'}) -> {args.dst}")
        print(
            f"  backbone dim {s['dim']}, depth {s['depth']}, heads {s['heads']}; landmark CNN: "
            f"{'yes' if s['landmark_cnn'] else 'no'}; "
            f"margin head: {s['num_classes'] or 'no'} classes; DINO head: {'yes' if s['dino_head'] else 'no'}"
        )
        if s["ignored"]:
            print(f"  ignored (unused by the reference's forward): {', '.join(s['ignored'])}")
    elif args.action == "export":
        export_reference(args.src, args.dst, args.format)
        print(f"exported {args.src} -> {args.dst} ({args.format})")
    else:
        obj = safe_load(args.src)
        try:
            kind = detect_format(obj)
        except ValueError as exc:
            raise named(args.src, exc) from None
        print(f"{args.src}: {kind}")
        if kind == "lafs-fast":
            m = obj["model"]
            print(
                f"  backbone dim {m['dim']}, depth {m['depth']}, heads {m['heads']}x{m['head_dim']}, tokens "
                f"{m['num_patches']}"
            )
            for part in ("landmark_cnn", "margin_head", "dino_head"):
                sd = obj.get(part)
                print(f"  {part}: {'none' if sd is None else f'{sum(v.numel() for v in sd.values()):,} values'}")
        else:
            parts = split_reference(obj)
            print(
                f"  backbone tensors {len(parts['backbone'])}; landmark CNN: {parts['landmark_cnn'] is not None}; "
                f"margin head: {parts['margin_head'] is not None}; DINO head: {parts['dino_head'] is not None}"
            )
            obj = parts
        for part in ("backbone", "landmark_cnn", "margin_head", "dino_head"):  # after the summary: say what is wrong
            check_finite(obj.get(part), f"{args.src}: {part}")
    return 0
