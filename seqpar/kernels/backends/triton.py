"""Backend "triton": seqpar's Triton kernels (`kernels/triton/`), host side glue.

The kernels take the causal offset natively (no pieces), map query heads to KV heads
without repeating K/V, take any strides and return fp32 (`triton/attention.py`); their
blocks merge with the fused one-pass merge of `triton/merge.py`. Importing those modules
imports triton and decides, once, whether the kernels run compiled (CUDA) or in Triton's
CPU interpreter (`TRITON_INTERPRET=1`), so they are imported on first use, never when
seqpar is.
"""
from __future__ import annotations

from typing import Optional

import torch


def _attention():
    from ..triton import attention

    return attention


SOFTCAP = True  # the kernels take `softcap` (a window's lower bound comes cut by pieces.band_*)


def forward(q, k, v, scale, offset, lo=None, softcap=0.0):
    if lo is not None:
        raise ValueError("triton: a window's lower bound reaches the kernel cut into one-sided blocks (block.py)")
    return _attention().forward(q, k, v, scale, offset, softcap=softcap)


def backward(do, q, k, v, out, lse, scale, offset, lo=None, softcap=0.0):
    if lo is not None:
        raise ValueError("triton: a window's lower bound reaches the kernel cut into one-sided blocks (block.py)")
    return _attention().backward(do, q, k, v, out, lse, scale, offset, softcap=softcap)


def merge(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor) -> None:
    """The fused merge (`triton/merge.py`): the formula of `merge.merge_` in one pass."""
    from ..triton.merge import merge_ as fused_merge

    fused_merge(out, lse, part_out, part_lse)


def unavailable_reason(device: torch.device, dtype: torch.dtype, head_dim: int, scale: float = 1.0) -> Optional[str]:
    try:
        triton_attention = _attention()
    except Exception as exc:  # ImportError, or a triton build that does not load here
        return f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"triton takes float16, bfloat16 or float32, got {dtype} (backend='torch' serves float64)"
    if head_dim > triton_attention.MAX_HEAD_DIM:
        return f"triton takes head_dim <= {triton_attention.MAX_HEAD_DIM}, got {head_dim}"
    if device.type == "cpu":
        if not triton_attention.INTERPRETED:
            return ("triton runs on cpu only in Triton's interpreter (slow; for tests): set TRITON_INTERPRET=1 "
                    "before seqpar's triton kernels are first imported")
        if dtype == torch.bfloat16:
            return "triton on cpu (the interpreter) has no bfloat16, got torch.bfloat16; use float16 or float32"
        return None
    if device.type == "cuda":
        if triton_attention.INTERPRETED:
            return ("seqpar's triton kernels were imported under TRITON_INTERPRET=1 (the cpu interpreter); "
                    "unset it to compile them for cuda")
        if dtype == torch.bfloat16 and torch.cuda.is_available() and torch.cuda.get_device_capability(device) < (8, 0):
            return f"triton needs compute capability >= 8.0 for bfloat16, got {torch.cuda.get_device_capability(device)}"
        return None
    return f"triton serves cuda devices (and cpu under TRITON_INTERPRET=1), got {device.type}"
