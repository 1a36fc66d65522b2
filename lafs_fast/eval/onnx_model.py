"""ONNX models: the metadata lafs-fast writes into an exported ``.onnx``, and an Embedder that runs one.

``lafs-fast embed --export-onnx`` stores what a user of the graph must know in the file's
``metadata_props`` (string key -> string value; Netron, ``onnx.load(...).metadata_props`` and
onnxruntime's ``get_modelmeta().custom_metadata_map`` show them):

- ``lafs_fast.metadata_format``: ``1`` (this list);
- ``lafs_fast.version``: the lafs-fast version that wrote the file;
- ``lafs_fast.model``: ``Part fViT`` (landmark CNN + sampler + backbone) or ``fViT`` (regular grid);
- ``lafs_fast.input_color_order``: ``RGB``;
- ``lafs_fast.input_layout``: ``NCHW float32``;
- ``lafs_fast.input_normalisation``: ``x/255*2-1`` (uint8 pixels x);
- ``lafs_fast.input_size``: ``112`` (aligned faces, ``S x S``);
- ``lafs_fast.flip_sum``: ``false``: the graph embeds the image alone; the verification protocol adds
  the mirrored image's embedding, then L2-normalises;
- ``lafs_fast.embedding_normalised``: ``false`` (raw embedding);
- ``lafs_fast.embedding_dim``: the embedding width.

``eval`` and ``embed`` run an ``.onnx`` MODEL with onnxruntime (:class:`OnnxEmbedder`): they read
these keys back and refuse, in one sentence, a file whose metadata says other than what they feed it
(another colour order, layout or normalisation, a graph that already flip-sums, a newer format). A
file without lafs-fast metadata (exported elsewhere) runs with a warning naming what is assumed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from lafs_fast.eval.embedder import INPUT_NORMS, Embedder

__all__ = ["METADATA_FORMAT", "onnx_metadata", "stamp_metadata", "check_metadata", "OnnxEmbedder"]

log = logging.getLogger(__name__)

METADATA_FORMAT = 1
PREFIX = "lafs_fast."
_FORMULAS = {"train": "x/255*2-1", "reference": "x/255-0.5"}  # INPUT_NORMS' keys -> the formula stored
# what the Embedder feeds a graph and expects back: the keys a file must agree with
_EXPECTED = {
    "input_color_order": "RGB",
    "input_layout": "NCHW float32",
    "flip_sum": "false",
    "embedding_normalised": "false",
}


def onnx_metadata(model: torch.nn.Module, image_size: int = 112) -> dict[str, str]:
    """The metadata (module doc) of ``model`` (a PartFViT or FViT) exported at ``image_size``."""
    from lafs_fast import __version__
    from lafs_fast.models.part_fvit import PartFViT

    backbone = model.backbone if isinstance(model, PartFViT) else model
    meta = {
        "metadata_format": str(METADATA_FORMAT),
        "version": __version__,
        "model": "Part fViT" if isinstance(model, PartFViT) else "fViT",
        **_EXPECTED,
        "input_normalisation": _FORMULAS["train"],
        "input_size": str(int(image_size)),
        "embedding_dim": str(int(backbone.dim)),
    }
    return {PREFIX + k: v for k, v in meta.items()}


def stamp_metadata(path: str | Path, meta: dict[str, str]) -> None:
    """Write ``meta`` into the ``metadata_props`` of the ONNX file ``path`` (in place; keys already
    there are kept unless ``meta`` names them)."""
    import onnx

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    onnx.helper.set_model_props(model, {**props, **meta})
    onnx.save(model, str(path))


def check_metadata(meta: dict[str, str], path: str | Path, input_norm: str) -> bool:
    """Refuse (ValueError, one sentence) an ONNX file whose lafs-fast metadata disagrees with what
    the Embedder feeds it under ``input_norm`` (a key of INPUT_NORMS). Returns False when the file
    has no lafs-fast metadata at all (a foreign export: the caller warns), True when it agrees."""
    ours = {k[len(PREFIX) :]: v for k, v in meta.items() if k.startswith(PREFIX)}
    if not ours:
        return False
    fmt = ours.get("metadata_format", "")
    if not fmt.isdigit() or int(fmt) > METADATA_FORMAT:
        raise ValueError(
            f"{path} has lafs-fast metadata format {fmt!r} (written by lafs-fast {ours.get('version', '?')}); "
            f"this lafs-fast reads format {METADATA_FORMAT}: upgrade lafs-fast"
        )
    for key, want in _EXPECTED.items():
        if ours.get(key, want) != want:
            raise ValueError(
                f"{path} says {key} = {ours[key]!r} in its metadata, but lafs-fast feeds and reads {want!r}; "
                "export it again with `lafs-fast embed --export-onnx`"
            )
    norm = ours.get("input_normalisation", _FORMULAS["train"])
    if norm != _FORMULAS[input_norm]:
        other = next((k for k, f in _FORMULAS.items() if f == norm), None)
        fix = f"pass --input-norm {other}" if other else "export it again with `lafs-fast embed --export-onnx`"
        raise ValueError(
            f"{path} expects inputs {norm} (its metadata) but --input-norm {input_norm} gives {_FORMULAS[input_norm]}; "
            f"{fix}"
        )
    return True


def _providers(device: str, available: list[str]) -> list:
    """onnxruntime providers for ``device``: ``auto`` takes CUDA where this onnxruntime has it (else
    the CPU); an explicit ``cuda[:N]`` without it is refused rather than run on the CPU unasked."""
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    dev = torch.device(device)
    if dev.type == "cpu":
        return ["CPUExecutionProvider"]
    if dev.type != "cuda" or "CUDAExecutionProvider" not in available:
        raise ValueError(
            f"onnxruntime here cannot run on {device} (providers: {', '.join(available)}); "
            "use --device cpu or install onnxruntime-gpu"
        )
    return [("CUDAExecutionProvider", {"device_id": dev.index or 0}), "CPUExecutionProvider"]


class OnnxEmbedder(Embedder):
    """An :class:`Embedder` whose forward pass is an ONNX graph run by onnxruntime: the same
    decoding, normalisation, batching and flip-sum as a PyTorch model, float32.

    The graph's first input must be float32 (B, 3, S, S) and its first output (B, dim). ``S`` and
    ``dim`` come from the metadata (checked against the graph's static shapes), or from the graph
    alone for a foreign file (S = 112 where the graph leaves it open). ``device``: ``auto``, ``cpu``
    or ``cuda[:N]``, the onnxruntime provider (:func:`_providers`); ``dtype`` must be auto or fp32.
    """

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        dtype: str = "auto",
        batch_size: int = 128,
        flip: bool = True,
        input_norm: str = "train",
    ) -> None:
        from lafs_fast.errors import require_extra

        require_extra("running an .onnx model", "onnx", "onnxruntime")
        import onnxruntime as ort

        if input_norm not in INPUT_NORMS:
            raise ValueError(f"unknown input normalisation {input_norm!r}; choose one of {', '.join(INPUT_NORMS)}")
        if dtype not in ("auto", "fp32"):
            raise ValueError(f"an .onnx model runs in float32 (its graph's type), not {dtype}; drop --dtype")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path} does not exist")
        providers = _providers(device, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ValueError(f"{path} is not an ONNX model onnxruntime can load ({type(exc).__name__})") from None
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        known = check_metadata(meta, path, input_norm)
        self.input_name, self.output_name = self.session.get_inputs()[0].name, self.session.get_outputs()[0].name
        self.image_size, self._dim = self._shapes(path, meta if known else {})
        if not known:
            log.warning(
                "%s carries no lafs-fast metadata (a foreign export?): assuming RGB (B, 3, %d, %d) float32 "
                "inputs %s and a raw embedding without flip-sum",
                path,
                self.image_size,
                self.image_size,
                _FORMULAS[input_norm],
            )
        self.path, self.metadata, self.has_metadata = path, meta, known
        self.device = torch.device("cpu")  # inputs go to onnxruntime as numpy arrays
        self.dtype_name, self.dtype = "fp32", torch.float32
        self.batch_size, self.flip, self.input_norm = int(batch_size), bool(flip), input_norm
        self.sampler_backend = "onnx"
        self.is_part = False
        self.provider = self.session.get_providers()[0]
        version = meta.get(PREFIX + "version")
        self.checkpoint_kind = f"ONNX written by lafs-fast {version}" if version else "ONNX without lafs-fast metadata"

    def _shapes(self, path: Path, meta: dict[str, str]) -> tuple[int, int]:
        """(input size S, embedding dim) from the metadata and the graph's static shapes, checked."""
        shape_in, shape_out = self.session.get_inputs()[0].shape, self.session.get_outputs()[0].shape
        kind_in = self.session.get_inputs()[0].type
        if len(shape_in) != 4 or (isinstance(shape_in[1], int) and shape_in[1] != 3) or kind_in != "tensor(float)":
            raise ValueError(
                f"{path} takes {kind_in} {shape_in}, not float32 images (B, 3, S, S); lafs-fast cannot feed it"
            )
        static = [d for d in shape_in[2:] if isinstance(d, int)]
        size = int(meta.get(PREFIX + "input_size", static[0] if static else 112))
        if any(d != size for d in static):
            raise ValueError(f"{path} says input_size {size} in its metadata but its graph takes {shape_in}")
        if len(shape_out) != 2 or not isinstance(shape_out[1], int):
            raise ValueError(f"{path} outputs {shape_out}, not an embedding (B, dim); lafs-fast cannot read it")
        dim = int(meta.get(PREFIX + "embedding_dim", shape_out[1]))
        if dim != shape_out[1]:
            raise ValueError(f"{path} says embedding_dim {dim} in its metadata but its graph outputs {shape_out}")
        return size, dim

    @property
    def dim(self) -> int:
        return self._dim

    def describe(self) -> str:
        """One line: the graph, provider, normalisation, flip (as :meth:`Embedder.describe`)."""
        kind = self.metadata.get(PREFIX + "model", "foreign graph")
        return (
            f"ONNX {kind} ({self.path.name}, onnxruntime {self.provider}), dim {self.dim}, fp32, "
            f"inputs {INPUT_NORMS[self.input_norm]}{', flip-sum' if self.flip else ''}"
        )

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """x (B, 3, S, S) float32 -> (embedding (B, dim) float32, no landmarks)."""
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x.cpu().numpy())})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)), None

    def landmarks(self, images) -> np.ndarray:
        raise ValueError(f"{self.path} (ONNX) outputs embeddings only; use the PyTorch model file for landmarks")
