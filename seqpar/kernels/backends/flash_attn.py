"""Backend "flash_attn": flash-attn's kernels, and the one place that touches flash-attn.

flash-attn's `_flash_attn_forward/_flash_attn_backward` are private and have changed
arguments between releases (window sizes, softcap, alibi, return arity); peers that call
them directly break on every release. This adapter fills arguments by name from the
installed signature and reads outputs by position, so a new release with a new optional
argument keeps working, and `backends.verify_once` checks the numbers on first use.
flash-attn's causal mask is bottom-right aligned; we only ever ask it for square causal
pieces (see `pieces.square_pieces`), where both alignments agree. Merged by the reference
merge.
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch

from ..memory import unit_stride
from ..pieces import pieces_backward, pieces_forward


@functools.lru_cache(maxsize=1)
def _module():
    try:
        from flash_attn import flash_attn_interface
    except Exception:  # ImportError, or a binary built for another torch
        return None
    return flash_attn_interface


def unavailable_reason(device: torch.device, dtype: torch.dtype, head_dim: int, scale: float = 1.0) -> Optional[str]:
    if scale <= 0:
        return f"flash_attn needs softmax_scale > 0, got {scale} (backend='torch' serves it)"
    if _module() is None:
        return "flash_attn is not installed (pip install 'seqpar[flash]')"
    if device.type != "cuda":
        return f"flash_attn needs a CUDA device, got {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash_attn needs float16 or bfloat16, got {dtype}"
    if head_dim > 256 or head_dim % 8:
        return f"flash_attn needs head_dim <= 256 and a multiple of 8, got {head_dim}"
    return None


def _call(fn, **values):
    params = inspect.signature(fn).parameters
    kwargs = {}
    for name, param in params.items():
        if name in values:
            kwargs[name] = values[name]
        elif param.default is inspect.Parameter.empty:
            raise RuntimeError(f"flash_attn.{fn.__name__} wants argument {name!r}, which seqpar does not know")
    return fn(**kwargs)


_COMMON = dict(
    dropout_p=0.0,
    window_size=(-1, -1),
    window_size_left=-1,
    window_size_right=-1,
    softcap=0.0,
    alibi_slopes=None,
    return_softmax=False,
    deterministic=False,
    rng_state=None,
)


def _piece_forward(q, k, v, scale, causal):
    # flash-attn reads the head dim as unit-stride and takes any other strides
    q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
    res = _call(
        _module()._flash_attn_forward, q=q, k=k, v=v,
        softmax_scale=scale, causal=causal, **_COMMON,
    )
    return res[0], res[1]


def _piece_backward(do, q, k, v, out, lse, scale, causal):
    do, q, k, v, out = (unit_stride(t) for t in (do, q, k, v, out))
    # the gradients flash-attn writes must be unit-stride in the head dim too: empty_like
    # keeps a permuted input's strides, so they are allocated contiguous
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    _call(
        _module()._flash_attn_backward, dout=do, q=q, k=k,
        v=v, out=out, softmax_lse=lse.contiguous(), dq=dq, dk=dk, dv=dv,
        softmax_scale=scale, causal=causal, **_COMMON,
    )
    return dq, dk, dv


def forward(q, k, v, scale, offset):
    return pieces_forward(_piece_forward, q, k, v, scale, offset)


def backward(do, q, k, v, out, lse, scale, offset):
    return pieces_backward(_piece_backward, do, q, k, v, out, lse, scale, offset)


merge = None  # the reference merge
