"""fViT: the Part fViT / LAFS backbone, with the reference's semantics and state-dict names.

Module names follow the reference (``transformer.layers.N.0.fn.fn.to_qkv`` ...) so a reference
state dict loads with no key mapping (docs/method.md section 8). Semantics (section 2):

- tokens (B, N, 192) -> ``patch_to_embedding`` -> prepend CLS -> add ``pos_embedding[:, :N+1]``
  (a 36-token view uses positions 0..36) -> embedding dropout;
- pre-norm blocks, drop-path constant in every block, attention scale ``dim**-0.5`` (reference) or
  ``head_dim**-0.5``, qkv without bias, GELU MLP;
- output: the CLS token through a LayerNorm (``mlp_head``), no projection.

Packed views (:meth:`FViT.forward_packed`): every view of every crop tensor laid end to end in one
sequence (1, sum_i n_i * (N_i + 1), dim), each view embedded exactly as ``forward_features`` does
(CLS + position embedding per view), the blocks run ONCE with block-diagonal attention (``seqlens``
threaded through Transformer -> Residual -> PreNorm -> Attention), one CLS per view read back.
Drop-path stays per sample: in a packed row each segment (view) draws its own keep mask, expanded
over its tokens, so packing trains with the same stochastic depth as the batched path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from lafs_fast.models.attention import attention, resolve_attention, seqlen_runs
from lafs_fast.sampling import sample_patches

__all__ = ["FViT", "Block", "Attention", "FeedForward", "image_grid_tokens", "segment_drop_path"]


class Attention(nn.Module):
    """Multi-head self-attention; ``to_qkv`` packs q, k, v (heads major within each), no bias."""

    def __init__(
        self, dim: int, heads: int, head_dim: int, dropout: float, scale: float, backend: str = "auto"
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim, self.scale = heads, head_dim, scale
        self.backend = backend
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, backend: str, seqlens: tuple[int, ...] | None = None) -> torch.Tensor:
        """x: (B, N, dim) -> (B, N, dim); ``backend`` already resolved for x's device; ``seqlens``:
        x is a packed row (B 1) of segments that attend only within themselves."""
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, self.head_dim).unbind(2)
        out = attention(q, k, v, self.scale, backend, seqlens)
        return self.to_out(out.reshape(b, n, self.heads * self.head_dim))

    def forward_cls(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        """The CLS row of :meth:`forward` alone: x (B, N, dim) -> (B, 1, dim). Keys and values of all
        N tokens, the query of the first: the q projection, attention and output projection of the
        other N - 1 rows are skipped (the last block, whose other rows nothing reads)."""
        b, n, _ = x.shape
        inner = self.heads * self.head_dim
        w = self.to_qkv.weight  # (3 * inner, dim): q, k, v in that order
        q = F.linear(x[:, :1], w[:inner]).view(b, 1, self.heads, self.head_dim)
        k, v = F.linear(x, w[inner:]).view(b, n, 2, self.heads, self.head_dim).unbind(2)
        out = attention(q, k, v, self.scale, backend)
        return self.to_out(out.reshape(b, 1, inner))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(
        self, x: torch.Tensor, backend: str | None = None, seqlens: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        return self.net(x)  # token-wise: packing needs nothing here


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fn = fn

    def forward(self, x: torch.Tensor, backend: str, seqlens: tuple[int, ...] | None = None) -> torch.Tensor:
        return self.fn(self.norm(x), backend, seqlens)


class Residual(nn.Module):
    """x + drop_path(fn(x)); the reference's ``Residual_droppath``."""

    def __init__(self, fn: nn.Module, drop_path: float) -> None:
        super().__init__()
        self.fn = fn
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, backend: str, seqlens: tuple[int, ...] | None = None) -> torch.Tensor:
        y = self.fn(x, backend, seqlens)
        if seqlens is not None and self.training and isinstance(self.drop_path, DropPath):
            return x + segment_drop_path(y, seqlens, self.drop_path.drop_prob)
        return x + self.drop_path(y)


def segment_drop_path(y: torch.Tensor, seqlens: tuple[int, ...], p: float) -> torch.Tensor:
    """timm's per-sample drop path for a packed row: y (1, T, dim), one keep draw per segment.

    Each segment is kept with probability 1 - p and scaled by 1 / (1 - p) (``scale_by_keep``), as
    ``DropPath`` does per sample; a plain DropPath on the (1, T, dim) row would keep or drop all
    views of all images together.
    """
    if p == 0.0:
        return y
    keep = 1.0 - p
    mask = y.new_empty(len(seqlens)).bernoulli_(keep)
    if keep > 0.0:
        mask.div_(keep)
    parts, start = [], 0
    for n, count in seqlen_runs(tuple(seqlens)):
        parts.append(mask[start : start + count, None].expand(count, n).reshape(count * n))
        start += count
    return y * torch.cat(parts).view(1, -1, 1)


class Block(nn.ModuleList):
    """One transformer layer: [attention residual, feed-forward residual]. A ModuleList (the
    reference's ``layers.N.0`` / ``layers.N.1`` names) with a forward, so that it is the unit of
    regional compilation (:meth:`FViT.compile_blocks`)."""

    def forward(
        self, x: torch.Tensor, backend: str, seqlens: tuple[int, ...] | None = None, cls_only: bool = False
    ) -> torch.Tensor:
        """x (B, N, dim) -> (B, N, dim); ``cls_only``: -> (B, 1, dim), the CLS row alone (the last
        block of a forward that reads only CLS: every other row's query, attention, output
        projection, MLP and residuals are skipped; keys and values still see every token)."""
        attn, ff = self
        if cls_only:
            y = attn.fn.fn.forward_cls(attn.fn.norm(x), backend)
            return ff(x[:, :1] + attn.drop_path(y), backend)
        return ff(attn(x, backend, seqlens), backend, seqlens)


class Transformer(nn.Module):
    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        head_dim: int,
        mlp_dim: int,
        dropout: float,
        drop_path: float,
        scale: float,
        eps: float,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            Block(
                [
                    Residual(PreNorm(dim, Attention(dim, heads, head_dim, dropout, scale), eps), drop_path),
                    Residual(PreNorm(dim, FeedForward(dim, mlp_dim, dropout), eps), drop_path),
                ]
            )
            for _ in range(depth)
        )

    def forward(
        self, x: torch.Tensor, backend: str, seqlens: tuple[int, ...] | None = None, cls_only: bool = False
    ) -> torch.Tensor:
        """x: (B, N, dim) -> (B, N, dim); with ``seqlens``, x is a packed row (1, sum(seqlens), dim);
        ``cls_only`` (unpacked only): -> (B, 1, dim), the last block computing the CLS row alone."""
        *blocks, last = self.layers
        for block in blocks:
            x = block(x, backend, seqlens)
        if not cls_only:
            return last(x, backend, seqlens)
        # ``forward``, not the call: under regional compilation (train.compile) the CLS-only block
        # runs eager. Compiled, it traced a graph of its own per token length and grad mode (6
        # graphs instead of 3 for a pre-training step, the cold compile 2x: issue 21 item 5); eager,
        # it costs ~25 small launches once per forward, its heavy part (keys and values of every
        # token) one matmul either way.
        return last.forward(x, backend, cls_only=True)


def image_grid_tokens(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """A regular grid of patches (the reference's path without landmarks, and the DINO baseline).

    images: (B, 3, H, W) float -> tokens (B, (H/P)*(W/P), 3*P*P), each flattened (p1, p2, c).
    """
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


class FViT(nn.Module):
    """The face ViT backbone.

    Args:
        dim, depth, heads, head_dim, mlp_dim: sizes (reference 768, 12, 11, 64, 2048).
        num_patches: maximum token count (196); the position table has num_patches + 1 rows.
        patch_size: P; tokens have 3*P*P values.
        attn_scale: "dim" (reference quirk, dim**-0.5) or "head_dim".
        attention: "auto" | "xformers" | "sdpa" | "math".
        token_init_std: CLS / position init std (reference N(0, 1)).
        cls_only_last_block: :meth:`forward` runs the last block for the CLS row only (default; the
            other rows of its output are never read). False: every row, as ``forward_features``.
    """

    def __init__(
        self,
        dim: int = 768,
        depth: int = 12,
        heads: int = 11,
        head_dim: int = 64,
        mlp_dim: int = 2048,
        num_patches: int = 196,
        patch_size: int = 8,
        dropout: float = 0.1,
        emb_dropout: float = 0.1,
        drop_path: float = 0.1,
        ln_eps: float = 1e-5,
        attn_scale: str = "dim",
        attention: str = "auto",
        token_init_std: float = 1.0,
        cls_only_last_block: bool = True,
    ) -> None:
        super().__init__()
        if attn_scale not in ("dim", "head_dim"):
            raise ValueError(f"attn_scale must be 'dim' or 'head_dim', got {attn_scale!r}")
        resolve_attention(attention, torch.device("cpu"))  # validates the name early
        self.dim, self.patch_size, self.num_patches = dim, patch_size, num_patches
        self.token_dim = 3 * patch_size * patch_size
        self.attention_backend = attention
        self.cls_only_last_block = cls_only_last_block
        self._resolved: dict[str, str] = {}
        scale = (dim if attn_scale == "dim" else head_dim) ** -0.5
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim) * token_init_std)
        self.patch_to_embedding = nn.Linear(self.token_dim, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * token_init_std)
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(dim, depth, heads, head_dim, mlp_dim, dropout, drop_path, scale, ln_eps)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim, eps=ln_eps))

    @classmethod
    def from_config(cls, m: ModelConfig) -> FViT:  # noqa: F821 - lafs_fast.config.ModelConfig
        return cls(
            m.dim,
            m.depth,
            m.heads,
            m.head_dim,
            m.mlp_dim,
            m.num_patches,
            m.patch_size,
            m.dropout,
            m.emb_dropout,
            m.drop_path,
            m.ln_eps,
            m.attn_scale,
            m.attention,
            m.token_init_std,
        )

    def attention_for(self, device: torch.device) -> str:
        """The resolved attention backend on ``device`` (cached; call once before torch.compile)."""
        key = device.type
        if key not in self._resolved:
            self._resolved[key] = resolve_attention(self.attention_backend, device)[0]
        return self._resolved[key]

    def compile_blocks(self, **kwargs) -> None:
        """Regional compilation (``train.compile``): each transformer block is compiled in place
        (``nn.Module.compile(**kwargs)``) and the blocks share one compiled graph per input shape,
        grad mode and train / eval mode (Dynamo lifts a block's parameters to graph inputs), so a
        cold compile costs one block per token length, not the whole depth. Embedding, CLS readout
        and final norm stay eager (a few small ops). Resolve the attention backend first
        (:meth:`attention_for`)."""
        for block in self.transformer.layers:
            block.compile(**kwargs)

    def set_attention(self, backend: str) -> None:
        resolve_attention(backend, torch.device("cpu"))
        self.attention_backend = backend
        self._resolved.clear()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, N, 3*P*P) -> (B, N+1, dim): patch embedding, CLS prepended, positions 0..N
        added; before the embedding dropout."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.token_dim:
            raise ValueError(f"tokens must be (B, N, {self.token_dim}), got {tuple(tokens.shape)}")
        b, n, _ = tokens.shape
        if n > self.num_patches:
            raise ValueError(f"{n} tokens exceed the {self.num_patches} positions of the position embedding")
        x = self.patch_to_embedding(tokens)
        x = torch.cat((self.cls_token.expand(b, -1, -1).to(x.dtype), x), dim=1)
        return x + self.pos_embedding[:, : n + 1]

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, N, 3*P*P) -> all outputs (B, N+1, dim), CLS first, before the final norm."""
        x = self.dropout(self.embed(tokens))
        return self.transformer(x, self.attention_for(x.device))

    def forward_packed(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """Embeddings (sum n_i, dim) of crops [(n_i, N_i, 3*P*P), ...], every view in ONE packed row.

        Equal to ``torch.cat([self(c) for c in crops])`` (same rows, same order) up to float
        rounding: each view is embedded as in ``forward_features`` (its own CLS, positions 0..N_i),
        the views are laid end to end as (1, sum_i n_i * (N_i + 1), dim), and the blocks run once
        with block-diagonal attention over the per-view segments (xformers' BlockDiagonalMask on
        CUDA, an exact per-run torch twin elsewhere; models/attention.py). Drop-path draws one mask
        per view (:func:`segment_drop_path`). dtype: the tokens' (the patch embedding's under autocast).
        """
        if not crops:
            raise ValueError("forward_packed needs at least one crop tensor")
        embs = [self.embed(c) for c in crops]  # [(n_i, N_i + 1, dim)]
        seqlens = tuple(e.shape[1] for e in embs for _ in range(e.shape[0]))
        x = torch.cat([e.reshape(1, -1, e.shape[-1]) for e in embs], dim=1)  # (1, T, dim), view-major
        x = self.transformer(self.dropout(x), self.attention_for(x.device), seqlens)
        cls, start = [], 0
        for e in embs:
            n, length = e.shape[0], e.shape[1]
            cls.append(x[0, start : start + n * length].view(n, length, -1)[:, 0])  # each view's CLS output
            start += n * length
        return self.mlp_head(torch.cat(cls))

    def forward(self, x: torch.Tensor | list[torch.Tensor], coords: torch.Tensor | None = None) -> torch.Tensor:
        """Embedding (B, dim) from tokens (B, N, 192), or images (B, 3, H, W) in [-1, 1] with
        landmarks ``coords`` (B, L, 2) px, or images alone (a regular grid of patches).

        A list of token tensors runs :meth:`forward_packed` (through ``forward`` so that a
        ``module.compile()``-d backbone compiles the packed path too)."""
        if isinstance(x, (list, tuple)):
            if coords is not None:
                raise ValueError("packed views take token tensors only, not images with coords")
            return self.forward_packed(list(x))
        if x.dim() == 4:
            x = (
                sample_patches(x, coords, self.patch_size)
                if coords is not None
                else image_grid_tokens(x, self.patch_size)
            )
        return self.mlp_head(self.forward_cls(x))

    def forward_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, 3*P*P) -> the CLS output (B, dim) before the final norm: ``forward_features(
        tokens)[:, 0]`` with the last block computing the CLS row alone (``cls_only_last_block``,
        about 1/depth of the FLOPs and activation bytes saved). In eval mode, and in training with
        ``dropout`` 0, the same numbers up to matmul rounding (tests/test_models.py); in training with
        dropout the CLS row draws its own dropout mask (same distribution, a shorter random stream)."""
        if not self.cls_only_last_block:
            return self.forward_features(tokens)[:, 0]
        x = self.dropout(self.embed(tokens))
        return self.transformer(x, self.attention_for(x.device), cls_only=True)[:, 0]
