"""Evaluation: verification ``.bin`` sets (10-fold accuracy, TAR@FAR), IJB-B/C 1:1, embeddings, ONNX, pictures.

The ``.bin`` format (a safe reader) and its builder are data tools: ``lafs_fast.data.binfile``,
``lafs_fast.data.make_bin``.

Modules (imported on use, so ``import lafs_fast.eval`` stays light):
- ``loading``: every lafs-fast model file / training checkpoint and the reference's checkpoints;
- ``knn``: the before/after k-NN check of training runs;
- ``metrics``: k-fold accuracy (InsightFace protocol), ROC, TAR at FAR;
- ``embedder``: ``Embedder`` - flip-sum embeddings of uint8 faces with any model from ``loading.load_eval_model``;
- ``verification``: ``evaluate_bin``, results table / JSON / scores files;
- ``ijb``: IJB-B/C template verification from the release layout;
- ``embed``: ``lafs-fast embed``; ``onnx_export``; ``onnx_model``: an .onnx file's metadata, ``OnnxEmbedder``;
- ``viz``: ``lafs-fast viz`` (landmarks, ROC, training curves); ``cli``: ``lafs-fast eval``.
"""
