"""seqpar as an attention implementation of Hugging Face transformers (`attn_implementation="seqpar"`).

    from seqpar.integrations.transformers import register, sequence_parallel
    register()                                          # once per process
    model = LlamaForCausalLM(config)                    # config._attn_implementation = "seqpar",
    layout = seqpar.SeqLayout(seq_len, scheme="zigzag") # or from_pretrained(..., attn_implementation="seqpar")
    batch = seqpar.nn.shard_batch({"input_ids": ids, "labels": labels}, layout)
    with sequence_parallel(layout):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    loss = seqpar.nn.cross_entropy_share(logits, batch["shift_labels"], layout)

Packed documents (e.g. `batch = DataCollatorWithFlattening()(examples)`, one row):

    layout = seqpar.SeqLayout(n, scheme="balanced", cu_seqlens=seqpar.nn.cu_seqlens_of(batch))
    local = seqpar.nn.shard_batch(batch, layout)        # position_ids inside each document

transformers is imported only by `register()`; seqpar never requires it.

Each model's attention layer calls `attention_forward(module, query, key, value,
attention_mask, scaling=, dropout=, **kwargs)` with `[B, H, S/P, D]` tensors of this rank's
tokens; it returns `([B, S/P, H, Dv], None)` (no attention weights). The layout, strategy,
backend and options come from the innermost `sequence_parallel(...)` block; outside any
block the layout is seqpar's default (contiguous, equal lengths, default group).

What the model's attention arguments become:
- **Sliding windows** (Mistral, Qwen2, Gemma2/3, gpt-oss: the layer passes `sliding_window=w`):
  transformers lets query i see key j when `i - j < w` (its masks: `kv_idx > q_idx - w`; its
  flash-attention path: `window_size=(w - 1, w - 1)`), so a causal layer runs
  `seqpar.attention(..., window_size=(w - 1, 0))` and a bidirectional one `(w - 1, w - 1)`
  (flash-attention's, and Gemma3's `|i - j| < w`), over global positions. A window of at
  least the sequence length masks nothing and is dropped, as transformers drops it.
- **Logit softcap** (Gemma2: `softcap=`) is flash-attn's, passed on as `softcap`.
- **Attention sinks** (gpt-oss: `s_aux=module.sinks`, `[H]` logits) are passed on as
  `sinks`; each rank's `sinks.grad` is its share, which `seqpar.nn.all_reduce_gradients`
  sums with the other replicated parameters.
- **Value head dim** (DeepSeek V2/V3 MLA): v is passed as it is; the output has v's head dim.
- **Packed documents.** The layout carries them (`SeqLayout(N, scheme=..., cu_seqlens=...)`,
  any scheme; `seqpar.nn.cu_seqlens_of(batch)` reads them off a packed batch). The model
  must be given the same documents: `position_ids` = each token's position inside its
  document (`layout.document_positions()`; `shard_batch` gives them; transformers'
  flash-attention convention: positions that restart mark documents), and, if the
  collator passes them (`DataCollatorWithFlattening(return_flash_attn_kwargs=True)`),
  `cu_seq_lens_q`/`cu_seq_lens_k` equal to the layout's global `cu_seqlens` and
  `max_length_q`/`max_length_k` equal to the longest document. Anything else raises a
  `ValueError` on every rank naming the first difference.
- **Masks.** transformers builds masks for the length it sees, the local shard, which
  would be wrong. seqpar registers its own mask function, which returns None for
  unpadded input: attention is causal (or full, for layers with `is_causal=False`) over
  *global* positions, within documents, inside the layer's window. A padding mask with
  any padded token is refused (pack the sequences instead: concatenate them into batch 1
  and give the layout their boundaries), and so are mask overlays (e.g. bidirectional
  image tokens), a 4D mask passed by the caller, `position_bias` and `head_mask`.
- **Positions.** Pass `position_ids` = the layout's positions (`shard_batch` does;
  `layout.document_positions()`, which is `layout.positions()` without documents).
  transformers' default, `arange(local_len)`, is wrong on every rank but the first of a
  contiguous layout; if the layer passes `position_ids` along (Llama-family models do),
  anything else is refused.
- **No KV cache, no dropout**: pass `use_cache=False` (a cache would feed longer keys
  than queries: refused), keep `attention_dropout=0` in training (refused otherwise).
- **Loss.** Do not pass `labels` to the model: it would shift them on the local shard.
  Use `shard_batch` (shifts globally, masks document ends) and `seqpar.nn.cross_entropy_share`.

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
from ..nn.training import _bounds, _show

NAME = "seqpar"
# kwargs a layer may pass that change what attention computes and seqpar cannot honour
_UNSUPPORTED_KWARGS = ("position_bias", "head_mask")
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

    A layout that leaves a rank without tokens (possible with documents) raises a
    ValueError here, on every rank alike (each computes every rank's share): transformers
    models cannot run on an empty shard, and that rank would fail before its peers'
    collectives.
    """
    if isinstance(layout, SeqLayout) and 0 in layout.local_lens:
        empty = [r for r, n in enumerate(layout.local_lens) if n == 0]
        raise ValueError(
            f"layout: expected every rank to hold at least one token (a transformers model cannot run on an empty "
            f"shard), got local lengths {layout.local_lens} ({layout.scheme} over {layout.world_size} ranks, "
            f"{'no documents' if layout.documents is None else f'{len(layout.documents) - 1} documents'}): rank(s) "
            f"{empty} hold none; use a longer sequence, fewer ranks or another scheme (contiguous never leaves a rank "
            f"empty)")
    token = _current.set(_Config(layout, strategy, backend, dict(options)))
    try:
        yield
    finally:
        _current.reset(token)


def _check_positions(position_ids, layout) -> None:
    """`position_ids` must be the layout's: each token's position inside its document
    (`layout.document_positions()`, the global position without documents)."""
    if not isinstance(position_ids, torch.Tensor):
        return
    # what decides a rank's positions (the default layout is a new object on every call)
    positions_of = (layout.geometry, layout.rank)
    if (_verified["tensor"] is not None and _verified["tensor"]() is position_ids
            and _verified["version"] == position_ids._version and _verified["positions_of"] == positions_of):
        return
    documents = layout.documents
    expected = layout.document_positions(device=position_ids.device)
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
        if documents is None:
            what = ("the layout's global positions (layout.positions(): pass those or shard_batch's; the model's "
                    "default arange(local_len) is wrong under sequence parallelism; for packed documents give the "
                    "layout their boundaries, SeqLayout(seq_len, cu_seqlens=...), and pass "
                    "layout.document_positions())")
        else:
            what = (f"each token's position inside its document (layout.document_positions() of the layout's "
                    f"{len(documents) - 1} documents: pass those or shard_batch's; the model must be given the "
                    f"layout's documents)")
        raise ValueError(
            f"position_ids: expected {what} on rank {layout.rank}, got {len(wrong)} that differ, the first at row "
            f"{row}, index {col}: expected [{lo}:{hi}] = {expected[lo:hi].tolist()}, got {rows[row, lo:hi].tolist()}"
        )
    _verified.update(tensor=weakref.ref(position_ids), version=position_ids._version, positions_of=positions_of)


def _check_documents(kwargs, layout) -> None:
    """`cu_seq_lens_q`/`_k` and `max_length_q`/`_k`, when the model was given them, must be
    the layout's documents (global boundaries) and the longest document's length."""
    bounds = layout.documents if layout.documents is not None else (0, layout.seq_len)
    for name in ("cu_seq_lens_q", "cu_seq_lens_k"):
        value = kwargs.get(name)
        if value is None:
            continue
        given = _bounds(value, name)
        if given != bounds:
            hint = ("" if layout.documents is not None else
                    "; the layout has no documents: build it with SeqLayout(seq_len, cu_seqlens=...)")
            raise ValueError(
                f"{name}: expected the layout's global document boundaries layout.cu_seqlens = {_show(bounds)}, "
                f"got {_show(given)}{hint}")
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    for name in ("max_length_q", "max_length_k"):
        value = kwargs.get(name)
        if value is None:
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value.item())
        if isinstance(value, bool) or not isinstance(value, int) or value != longest:
            raise ValueError(f"{name}: expected {longest}, the length of the layout's longest document, "
                             f"got {brief(value)}")


def _window(sliding_window, is_causal: bool, seq_len: int) -> tuple:
    """transformers' `sliding_window=w` (key j visible to query i when `i - j < w`) as
    flash-attn's `window_size`; (-1, -1) when the window covers the sequence."""
    if sliding_window is None:
        return (-1, -1)
    if (isinstance(sliding_window, torch.Tensor) and sliding_window.numel() == 1
            and not sliding_window.is_floating_point()):
        sliding_window = int(sliding_window.item())
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"sliding_window: expected None or a positive int (keys with i - j < sliding_window are "
                         f"visible), got {brief(sliding_window)}")
    if sliding_window >= seq_len:
        return (-1, -1)
    left = sliding_window - 1
    return (left, 0) if is_causal else (left, left)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The transformers attention interface: `[B, H, S/P, D]` in, `([B, S/P, H, Dv], None)` out."""
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
        refused = [f"{name}: expected None, got {brief(kwargs[name])}" for name in _UNSUPPORTED_KWARGS
                   if kwargs.get(name) is not None]
        if refused:
            # every refused argument at once, so a user fixes them in one go
            raise ValueError("; ".join(refused) + " (seqpar attention takes no additive bias or head mask)")
        sinks = kwargs.get("s_aux")
        if kwargs.get("sinks") is not None:
            if sinks is not None and kwargs["sinks"] is not sinks:
                raise ValueError(f"sinks: expected None when s_aux is given (both are attention sinks), "
                                 f"got {brief(kwargs['sinks'])}")
            sinks = kwargs["sinks"]
        softcap = kwargs.get("softcap")
        _check_documents(kwargs, resolved)
        _check_positions(kwargs.get("position_ids"), resolved)
        return {"window_size": _window(kwargs.get("sliding_window"), bool(is_causal), resolved.seq_len),
                "softcap": 0.0 if softcap is None else softcap, "sinks": sinks}

    out = sequence_parallel_sdpa(query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal,
                                 scale=scaling, enable_gqa=True, layout=layout, strategy=config.strategy,
                                 backend=config.backend, options=config.options, names=_NAMES, extra_check=extra_check)
    return out, None


def mask_forward(batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, use_vmap=False, device=None, **kwargs):
    """The transformers mask interface: None when attention is plain (causal or full) over the whole sequence.

    Otherwise a mask tensor, which `attention_forward` refuses (on every rank) with the
    reason attached. transformers' packed-sequence and sliding-window masks are not built:
    the layout's documents and the layer's `sliding_window` serve them (under a zigzag or
    stripe layout the local positions also jump, which transformers would take for
    packing); `attention_forward` checks that the model's positions match the layout.
    """
    reason = None
    if attention_mask is not None and not bool(attention_mask.all()):
        reason = (f"{int((~attention_mask.bool()).sum())} padded token(s) in the padding mask; pad nothing, pack "
                  f"instead: concatenate the sequences into batch 1, give the layout their boundaries "
                  f"(SeqLayout(seq_len, cu_seqlens=[0, l1, l1+l2, ...])) and pass position_ids restarting at 0 for "
                  f"every sequence (seqpar.nn.shard_batch gives them)")
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
