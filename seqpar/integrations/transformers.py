"""seqpar as an attention implementation of Hugging Face transformers (`attn_implementation="seqpar"`).

    from seqpar.integrations.transformers import register, sequence_parallel
    register()                                          # once per process
    model = LlamaForCausalLM(config)                    # config._attn_implementation = "seqpar",
    layout = seqpar.SeqLayout(seq_len, scheme="zigzag") # or from_pretrained(..., attn_implementation="seqpar")
    batch = seqpar.nn.shard_batch({"input_ids": ids, "labels": labels}, layout)
    with sequence_parallel(layout):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    loss = seqpar.nn.cross_entropy_share(logits, batch["shift_labels"], layout)

transformers is imported only by `register()`; seqpar never requires it.

Each model's attention layer calls `attention_forward(module, query, key, value,
attention_mask, scaling=, dropout=, **kwargs)` with `[B, H, S/P, D]` tensors of this rank's
tokens; it returns `([B, S/P, H, D], None)` (no attention weights). The layout, strategy,
backend and options come from the innermost `sequence_parallel(...)` block; outside any
block the layout is seqpar's default (contiguous, equal lengths, default group).

What the model's usual inputs mean under sequence parallelism, and what is refused:
- **Masks.** transformers builds masks for the length it sees, the local shard, which
  would be wrong. seqpar registers its own mask function, which returns None for
  unpadded input, so attention is causal (or full, for models whose attention module has
  `is_causal=False`) over *global* positions. A padding mask with any padded token, a
  mask overlay (e.g. bidirectional image tokens), a 4D mask passed by the caller, a
  sliding window shorter than the sequence and a logit softcap the layer asks for are
  refused with a `ValueError` on every rank: they need masks seqpar's kernels do not take.
- **Positions.** Pass `position_ids` = the layout's global positions (`shard_batch` does,
  `layout.positions()` is the source). transformers' default, `arange(local_len)`, is wrong
  on every rank but the first of a contiguous layout; if the layer passes `position_ids`
  along (Llama-family models do), anything else is refused, which also refuses packed
  sequences (positions that restart).
- **No KV cache, no dropout**: pass `use_cache=False` (a cache would feed longer keys
  than queries: refused), keep `attention_dropout=0` in training (refused otherwise).
- **Loss.** Do not pass `labels` to the model: it would shift them on the local shard.
  Use `shard_batch` (shifts globally) and `seqpar.nn.cross_entropy_share`.

Every refusal is agreed on across ranks, like `seqpar.attention`'s errors.
"""
from __future__ import annotations

import contextlib
import contextvars
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from ..call import layout_for
from ..errors import brief
from ..layout import SeqLayout
from ..nn.functional import sequence_parallel_sdpa

NAME = "seqpar"
# kwargs a layer may pass that change what attention computes; seqpar cannot honour them
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux", "sinks", "position_bias", "head_mask", "cu_seq_lens_q",
                       "cu_seq_lens_k", "max_length_q", "max_length_k")
_NAMES = {"attn_mask": "attention_mask", "dropout_p": "dropout", "scale": "scaling"}


@dataclass(frozen=True)
class _Config:
    layout: Optional[SeqLayout] = None
    strategy: str = "auto"
    backend: str = "auto"
    options: Dict[str, Any] = field(default_factory=dict)


_current: contextvars.ContextVar = contextvars.ContextVar("seqpar_transformers_config", default=_Config())
# the position_ids tensor last found equal to a layout's positions (a model passes the same
# tensor to every layer, so one comparison serves a whole forward)
_verified = {"tensor": None, "version": None, "positions_of": None}


@contextlib.contextmanager
def sequence_parallel(layout: Optional[SeqLayout] = None, *, strategy: str = "auto", backend: str = "auto", **options):
    """Models called inside the block run seqpar attention over `layout` (this rank's tokens).

    `strategy`, `backend` and `**options` are those of `seqpar.attention`. The backward
    may run after the block: each attention call keeps what its backward needs.
    """
    token = _current.set(_Config(layout, strategy, backend, dict(options)))
    try:
        yield
    finally:
        _current.reset(token)


def _check_positions(position_ids, layout) -> None:
    if not isinstance(position_ids, torch.Tensor):
        return
    if not isinstance(layout, SeqLayout):
        return  # the bad layout itself is reported by seqpar.attention
    # what decides a rank's positions (the default layout is a new object on every call)
    positions_of = (layout.seq_len, layout.scheme, layout.world_size, layout.rank)
    if (_verified["tensor"] is not None and _verified["tensor"]() is position_ids
            and _verified["version"] == position_ids._version and _verified["positions_of"] == positions_of):
        return
    expected = layout.positions(device=position_ids.device)
    rows = position_ids.reshape(-1, position_ids.shape[-1]) if position_ids.dim() >= 1 else position_ids.reshape(1, 1)
    if rows.shape[-1] != expected.numel():
        raise ValueError(
            f"position_ids: expected {expected.numel()} positions per row (layout.local_len on rank {layout.rank}), "
            f"got shape {tuple(position_ids.shape)}"
        )
    wrong = (rows != expected).nonzero()
    if wrong.numel():
        row, col = wrong[0].tolist()
        lo, hi = max(0, col - 3), min(expected.numel(), col + 4)
        raise ValueError(
            f"position_ids: expected the layout's global positions (layout.positions(): pass those or shard_batch's; "
            f"the model's default arange(local_len) is wrong under sequence parallelism, and packed sequences are not "
            f"supported) on rank {layout.rank}, got {len(wrong)} that differ, the first at row {row}, index {col}: "
            f"expected [{lo}:{hi}] = {expected[lo:hi].tolist()}, got {rows[row, lo:hi].tolist()}"
        )
    _verified.update(tensor=weakref.ref(position_ids), version=position_ids._version, positions_of=positions_of)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The transformers attention interface: `[B, H, S/P, D]` in, `([B, S/P, H, D], None)` out."""
    config = _current.get()
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    layout = config.layout

    def extra_check():
        if layout is not None and not isinstance(layout, SeqLayout):
            raise TypeError(f"layout: expected a seqpar.SeqLayout or None, got {type(layout).__name__}")
        # the default layout is built from the local length: the one seqpar.attention will use
        resolved = layout if layout is not None else layout_for(None, query.transpose(1, 2), None)
        refused = []
        for name in _UNSUPPORTED_KWARGS:
            value = kwargs.get(name)
            if value is None:
                continue
            # a window that spans the whole sequence (key i - j < window for all i, j < N) masks nothing
            if name == "sliding_window" and isinstance(value, int) and resolved.seq_len <= value:
                continue
            limit = f" or an int >= seq_len={resolved.seq_len}" if name == "sliding_window" else ""
            refused.append(f"{name}: expected None{limit}, got {brief(value)}")
        if refused:
            # every refused argument at once, so a user fixes them in one go
            raise ValueError("; ".join(refused) + " (seqpar attention is plain causal or full attention over the "
                             "global sequence)")
        _check_positions(kwargs.get("position_ids"), resolved)

    out = sequence_parallel_sdpa(query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal,
                                 scale=scaling, enable_gqa=True, layout=layout, strategy=config.strategy,
                                 backend=config.backend, options=config.options, names=_NAMES, extra_check=extra_check)
    return out, None


def mask_forward(batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, use_vmap=False, device=None, **kwargs):
    """The transformers mask interface: None when attention is plain (causal or full) over the whole sequence.

    Otherwise a mask tensor, which `attention_forward` refuses (on every rank) with the
    reason attached. transformers' packed-sequence detection is ignored on purpose: under a
    zigzag or stripe layout the local positions jump, which it takes for packing; real
    packing is refused by the position check in `attention_forward`.
    """
    reason = None
    if attention_mask is not None and not bool(attention_mask.all()):
        reason = f"{int((~attention_mask.bool()).sum())} padded token(s) in the padding mask"
    elif use_vmap:
        reason = "the model overlays a mask function on causal attention (e.g. bidirectional image tokens)"
    if reason is None:
        return None
    mask = attention_mask if attention_mask is not None else torch.ones(batch_size, kv_length, dtype=torch.bool,
                                                                        device=device)
    mask = mask.clone()
    mask._seqpar_reason = reason
    return mask


def register(name: str = NAME) -> str:
    """Register seqpar's attention (and mask) function with transformers under `name`; idempotent.

    Returns `name`, for `attn_implementation=`. Raises ImportError without transformers.
    """
    try:
        from transformers import AttentionInterface
    except ImportError as exc:
        raise ImportError("seqpar.integrations.transformers needs transformers>=4.53 with AttentionInterface "
                          "(pip install 'seqpar[hf]')") from exc
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:
        # without a mask hook transformers silently drops padding masks for custom attention
        raise ImportError("seqpar.integrations.transformers needs transformers with "
                          "transformers.masking_utils.AttentionMaskInterface (>=4.53)") from exc
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_forward)
    return name
