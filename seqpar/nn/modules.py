"""`SequenceParallelAttention`: the core attention of a transformer layer as an nn.Module."""
from __future__ import annotations

import torch

from ..attention import attention
from .functional import scaled_dot_product_attention

QKV_FORMATS = ("bshd", "bhsd")


class SequenceParallelAttention(torch.nn.Module):
    """Exact softmax attention over a sequence split across ranks; no parameters.

    This is the *core* attention (softmax(q k^T * scale) v), the piece a model calls between
    its own q/k/v projections (and RoPE) and its output projection, like flash-attn's
    `flash_attn_func` or Transformer Engine's `DotProductAttention`. It owns no weights,
    so swapping it into a model changes no parameter names and loads the same checkpoints.

    `layout`: the `seqpar.SeqLayout` of the tensors (default None: contiguous, equal
    lengths, default group); `forward(..., layout=)` overrides it per call, e.g. when
    every batch has another length or other packed documents. `causal`, `softmax_scale`,
    `window_size` (sliding window, flash-attn's `(left, right)`), `softcap`, `strategy`,
    `backend` and strategy `**options` are those of `seqpar.attention`; attention sinks
    (`[H]` logits, usually a parameter of the calling layer) are passed per call,
    `forward(q, k, v, sinks=...)`. V may have its own head dim (MLA). `qkv_format`: "bshd" (default,
    `[B, S/P, H, D]`, flash-attn's order) or "bhsd" (`[B, H, S/P, D]`, PyTorch SDPA's order);
    the output has the same format. K/V may have fewer heads than Q (GQA/MQA).
    `qkv_format` is checked here; the other options when called, collectively, like
    `seqpar.attention` (bad input on one rank raises on every rank).
    """

    def __init__(self, layout=None, *, causal: bool = False, softmax_scale=None, window_size=(-1, -1),
                 softcap: float = 0.0, strategy: str = "auto", backend: str = "auto", qkv_format: str = "bshd",
                 **options):
        super().__init__()
        if qkv_format not in QKV_FORMATS:
            raise ValueError(f"qkv_format: expected one of {QKV_FORMATS}, got {qkv_format!r}")
        self.layout = layout
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.window_size = tuple(window_size) if isinstance(window_size, list) else window_size
        self.softcap = softcap
        self.strategy = strategy
        self.backend = backend
        self.qkv_format = qkv_format
        self.options = dict(options)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout=None,
                sinks=None) -> torch.Tensor:
        """`q` `[B, S/P, H, D]`, `k` `[B, S/P, H_kv, D]`, `v` `[B, S/P, H_kv, Dv]` (or the bhsd
        order) -> `[B, S/P, H, Dv]` (or bhsd). `sinks`: None or `[H]` attention-sink logits."""
        layout = self.layout if layout is None else layout
        masks = dict(window_size=self.window_size, softcap=self.softcap, sinks=sinks)
        if self.qkv_format == "bhsd":
            return scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=self.softmax_scale,
                                                enable_gqa=True, layout=layout, strategy=self.strategy,
                                                backend=self.backend, **masks, **self.options)
        return attention(q, k, v, layout=layout, causal=self.causal, softmax_scale=self.softmax_scale,
                         strategy=self.strategy, backend=self.backend, **masks, **self.options)

    def extra_repr(self) -> str:
        layout = "default" if self.layout is None else repr(self.layout)
        masks = "" if self.window_size == (-1, -1) else f"window_size={self.window_size}, "
        masks += f"softcap={self.softcap}, " if self.softcap else ""
        return (f"layout={layout}, causal={self.causal}, softmax_scale={self.softmax_scale}, {masks}"
                f"strategy={self.strategy!r}, "
                f"backend={self.backend!r}, qkv_format={self.qkv_format!r}")
