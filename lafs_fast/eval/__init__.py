"""Evaluation: verification ``.bin`` sets (10-fold accuracy, TAR@FAR), IJB-B/C 1:1, embeddings, ONNX, pictures.

Modules (imported on use, so ``import lafs_fast.eval`` stays light):
- ``loading``: every lafs-fast model file / training checkpoint and the reference's checkpoints;
- ``binfile``: safe ``.bin`` reader (restricted unpickler) and writer;
- ``metrics``: k-fold accuracy (InsightFace protocol), ROC, TAR at FAR;
- ``embedder``: ``Embedder`` - flip-sum embeddings of uint8 faces with any model from ``loading.load_eval_model``;
- ``verification``: ``evaluate_bin``, results table / JSON / scores files;
- ``ijb``: IJB-B/C template verification from the release layout;
- ``make_bin``: ``lafs-fast data make-bin``; ``embed``: ``lafs-fast embed``; ``onnx_export``;
- ``viz``: ``lafs-fast viz`` (landmarks, ROC, training curves); ``cli``: ``lafs-fast eval``.
"""
