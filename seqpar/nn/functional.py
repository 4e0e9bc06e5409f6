"""`scaled_dot_product_attention` with the signature of PyTorch's, over sequence shards.

    out = seqpar.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                            layout=layout)

`q` `[B, H, S/P, D]`, `k`/`v` `[B, H_kv, S/P, D]`: this rank's tokens of `layout` (the
`[batch, heads, seqlen, head_dim]` order of `torch.nn.functional.scaled_dot_product_attention`).
The result is this rank's rows of exact attention over the whole global sequence.

What PyTorch's function takes and this one refuses, with a `ValueError` naming the argument:
`attn_mask` other than None (under sequence parallelism a mask built for the local length
means nothing; causal masking is `is_causal=True` on global positions), `dropout_p` other
than 0, keys of another length than the queries (this is self-attention over one sequence
split across ranks). Beyond torch's signature it takes `window_size`, `softcap` and
`sinks` (those of `seqpar.attention`), and `value` may have its own head dim. Errors are agreed on
across ranks like `seqpar.attention`'s: bad input on one rank raises on every rank.

`sdpa_patched(layout)` swaps this function in for `torch.nn.functional.scaled_dot_product_attention`
inside a `with` block, for models that call `F.scaled_dot_product_attention` themselves.
"""
from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.nn.functional as F

from ..attention import run_strategy
from ..layout import SeqLayout
from ..errors import brief

# argument names of torch's function; the transformers glue passes its own (attention_mask, dropout, scaling)
_TORCH_NAMES = {"attn_mask": "attn_mask", "dropout_p": "dropout_p", "scale": "scale"}


def _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, layout, names) -> None:
    """Local checks, in the terms of the bhsd call (run_strategy's own checks speak bshd)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name}: expected 4 dims [batch, heads, seqlen, head_dim] (this rank's shard), "
                f"got shape {tuple(t.shape)}"
            )
    if attn_mask is not None:
        reason = getattr(attn_mask, "_seqpar_reason", None)
        given = (f"a tensor of shape {tuple(attn_mask.shape)}" if isinstance(attn_mask, torch.Tensor)
                 else type(attn_mask).__name__)
        raise ValueError(
            f"{names['attn_mask']}: expected None (sequence-parallel attention takes no mask: a mask of the local "
            f"length cannot describe the global sequence; use is_causal=True for causal attention), got {given}"
            + (f": {reason}" if reason else "")
        )
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"{names['dropout_p']}: expected a float, got {type(dropout_p).__name__}")
    if dropout_p != 0:
        raise ValueError(
            f"{names['dropout_p']}: expected 0.0 (attention dropout is not supported under sequence parallelism), "
            f"got {brief(dropout_p)}"
        )
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal: expected a bool, got {type(is_causal).__name__}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"{names['scale']}: expected a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"{names['scale']}: expected a finite float or None, got {brief(scale)}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa: expected a bool, got {type(enable_gqa).__name__}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise ValueError(f"{name}: expected dtype {query.dtype} (that of query), got {t.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name}: expected device {query.device} (that of query), got {t.device}")
    if key.shape[0] != query.shape[0]:
        raise ValueError(f"key: expected batch {query.shape[0]} (that of query), got {key.shape[0]}")
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"key: expected seqlen (dim 2) {query.shape[2]}, that of query: sequence-parallel attention is "
            f"self-attention over one sequence split across ranks, got {key.shape[2]}"
        )
    if key.shape[3] != query.shape[3]:
        raise ValueError(f"key: expected head_dim {query.shape[3]} (that of query), got {key.shape[3]}")
    if value.shape[:3] != key.shape[:3]:
        # the head dim may differ (MLA: DeepSeek's value head dim is not its query/key head dim)
        raise ValueError(f"value: expected batch, heads and seqlen {tuple(key.shape[:3])} (those of key) and any "
                         f"head_dim, got shape {tuple(value.shape)}")
    heads, kv_heads = query.shape[1], key.shape[1]
    if not enable_gqa and kv_heads != heads:
        raise ValueError(
            f"key: expected {heads} heads (that of query) with enable_gqa=False, got {kv_heads}; "
            f"pass enable_gqa=True for grouped-query attention"
        )
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"key: expected a number of heads that divides query's {heads} heads, got {kv_heads}")
    if isinstance(layout, SeqLayout) and query.shape[2] != layout.local_len:
        raise ValueError(
            f"query: expected seqlen (dim 2) {layout.local_len} (layout.local_len on rank {layout.rank}), "
            f"got {query.shape[2]}"
        )


def sequence_parallel_sdpa(query, key, value, *, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                           enable_gqa=False, layout=None, strategy="auto", backend="auto", options=None,
                           names=None, extra_check=None, window_size=(-1, -1), softcap=0.0, sinks=None):
    """The shared body: bhsd in, **bshd** out (callers transpose as they need).

    `names` renames arguments in error messages (the transformers glue says `attention_mask`);
    `extra_check()` runs with the local checks, and what it raises is agreed on too; it may
    return a dict that overrides `window_size`, `softcap` and `sinks` (what the caller
    derived from its own arguments while checking them).
    """
    options = options or {}
    names = names or _TORCH_NAMES
    masks = {"window_size": window_size, "softcap": softcap, "sinks": sinks}
    error = None
    try:
        _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, layout, names)
        if extra_check is not None:
            masks.update(extra_check() or {})
    except (ValueError, TypeError) as exc:
        error = exc
    if error is not None:
        # run_strategy raises it on this rank and makes every peer raise too
        run_strategy(strategy, query, key, value, layout=layout, causal=is_causal, softmax_scale=scale,
                     backend=backend, _error=error, **options)
        raise error  # unreachable: run_strategy raised
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    return run_strategy(strategy, q, k, v, layout=layout, causal=is_causal, softmax_scale=scale, backend=backend,
                        **masks, **options)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, layout=None, strategy="auto", backend="auto",
                                 window_size=(-1, -1), softcap=0.0, sinks=None, **options):
    """`torch.nn.functional.scaled_dot_product_attention` over sequence shards.

    `query` `[B, H, S/P, D]`, `key`/`value` `[B, H_kv, S/P, D]`: this rank's tokens of
    `layout` (default: contiguous, equal lengths, default group). Returns `[B, H, S/P, D]`,
    this rank's rows of attention over the global sequence, in the input dtype.
    `is_causal`: query at global position i sees keys j <= i. `scale`: default `D ** -0.5`.
    `enable_gqa`: as in torch, False requires `H == H_kv`; True allows `H % H_kv == 0`.
    `attn_mask` must be None and `dropout_p` 0 (ValueError otherwise). `value` may have its
    own head dim `Dv` (MLA); the result then has `Dv`. Keyword-only, as in `seqpar.attention`:
    `layout` (its documents, `cu_seqlens`, mask attention between documents), `strategy`,
    `backend`, `window_size=(left, right)` (flash-attn's sliding window, global positions),
    `softcap` (flash-attn's logit softcap, 0: none), `sinks` (`[H]` logits, gpt-oss's
    attention sinks) and strategy options.
    Collective: every rank of the layout's group calls it. Differentiable in q, k, v.
    """
    out = sequence_parallel_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                 scale=scale, enable_gqa=enable_gqa, layout=layout, strategy=strategy,
                                 backend=backend, options=options, window_size=window_size, softcap=softcap,
                                 sinks=sinks)
    return out.transpose(1, 2)


@contextlib.contextmanager
def sdpa_patched(layout=None, *, strategy="auto", backend="auto", **options):
    """Within the block, `torch.nn.functional.scaled_dot_product_attention` is seqpar's, bound to `layout`.

    For models that call `F.scaled_dot_product_attention(...)` (an attribute lookup at call
    time) on local shards. The patch is process-wide (every thread sees it) and is undone on
    exit; nested blocks restore in order. Code that bound the function itself before the
    block (`from torch.nn.functional import scaled_dot_product_attention`) is not affected.
    Every call inside the block must be over this rank's shards of `layout`: dense attention
    elsewhere in the block (a second model, a metric) would be made sequence-parallel too.
    Yields the function in place.
    """

    def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                            layout=layout, strategy=strategy, backend=backend, **options)

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = patched
    try:
        yield patched
    finally:
        F.scaled_dot_product_attention = original
