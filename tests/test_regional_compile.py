"""Regional compilation (``FViT.compile_blocks``, what ``train.compile`` does to a backbone): the
blocks of every depth share one traced graph per input shape and mode, so a cold compile traces
one block per token length, not the whole depth. Traced with Dynamo's ``eager`` backend (no code
generation: seconds); ``tests/test_compile.py`` checks the Inductor numbers against eager."""

from __future__ import annotations

import pytest
import torch

from lafs_fast.models.fvit import FViT

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(depth: int) -> FViT:
    torch.manual_seed(0)
    return FViT(
        dim=16,
        depth=depth,
        heads=2,
        head_dim=8,
        mlp_dim=32,
        num_patches=16,
        dropout=0.0,
        emb_dropout=0.0,
        drop_path=0.0,
        attention="math",
    )


def test_blocks_share_one_graph_per_shape_and_match_eager():
    from torch._dynamo.utils import counters

    eager, compiled = _tiny(3), _tiny(3)
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled.attention_for(torch.device("cpu"))
        compiled.compile_blocks(dynamic=False, backend="eager")
        # state-dict names stay the reference's (layers.N.0 / layers.N.1), untouched by compiling
        assert list(compiled.state_dict()) == list(eager.state_dict())
        assert "transformer.layers.2.1.fn.fn.net.3.weight" in compiled.state_dict()
        for n in (16, 4, 16):  # a global and a local view length, then the global one again
            x = torch.randn(2, n, 192)
            torch.testing.assert_close(compiled(x), eager(x))
        # the packed path (views.pack): one more graph (block-diagonal attention over fixed seqlens)
        torch.testing.assert_close(compiled([x, x[:, :3]]), eager([x, x[:, :3]]))
        # 3 blocks x (16, 4 tokens, packed): 3 graphs shared by the blocks (9 if each traced its own);
        # the last block's CLS-only form runs eager (issue 21 item 5: it traced 2 more graphs)
        assert all(b._compiled_call_impl is not None for b in compiled.transformer.layers)
        assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    finally:
        torch._dynamo.reset()
