"""Data: InsightFace RecordIO without MXNet, DALI / nvJPEG / PIL loaders, synthetic faces, tools.

``make_loader(source, batch_size, ...)`` is the one entry for training (see ``loaders.py``);
``SyntheticFaces`` the built-in dataset; ``RecordIOReader`` / ``RecordIOWriter`` the file format;
``binfile`` / ``make_bin`` the verification ``.bin`` format (a safe reader) and its builder.
Layout: ``recordio`` (format, reader), ``recordio_writer`` -> ``sources`` (rec / folder items) ->
``base`` (the Loader contract) -> ``loaders`` (PIL, nvJPEG, synthetic, the factory) and ``dali``. Heavy modules (DALI,
face-alignment) load only when used.
"""

from lafs_fast.data.base import Loader
from lafs_fast.data.loaders import make_loader, resolve_loader_backend
from lafs_fast.data.recordio import RecordIOReader
from lafs_fast.data.recordio_writer import RecordIOWriter
from lafs_fast.data.synthetic import SyntheticFaces

__all__ = ["Loader", "make_loader", "resolve_loader_backend", "RecordIOReader", "RecordIOWriter", "SyntheticFaces"]
