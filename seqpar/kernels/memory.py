"""Memory layout and accumulation dtype of the block kernels' tensors (imports no backend).

Every backend takes q, k, v, out and dO with any strides. PyTorch's fused flash ops (CPU
and CUDA) and flash-attn read the head dim as if its stride were 1 (a `x[..., ::2]` view
or a `[B, n, D, H]` buffer seen as `[B, n, H, D]` came back as garbage), so their pieces
copy exactly the tensors whose `stride(-1) != 1` (`unit_stride`), once; the common
layouts pay nothing. Outputs and gradients of a block come back in `acc_dtype` (fp32; fp64
for fp64 inputs), `[B, n, H, D]`-contiguous: the callers' layout and flash-attn's, and the
one PyTorch's fused flash ops return their gradients in whatever the inputs' strides (the
CPU op returns its output in q's layout). The CPU block kernels timed alike on
`[B, n, H, D]`- and `[B, H, n, D]`-contiguous inputs (torch 2.13, one thread,
interleaved: within 3%), so no backend has a layout of its own. With equal q and KV heads
and q in that layout the sdpa blocks' outputs need no copy; a GQA block whose query
heads fold into rows (`backends/sdpa.py`) returns its output and dQ heads-first, and they
are copied (as its dK/dV were into the heads-first layout sdpa used to have).
"""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit_stride(x: torch.Tensor) -> torch.Tensor:
    """`x` when its last dim has stride 1, else a contiguous copy: the fused flash ops and
    flash-attn index the head dim as if stride(-1) were 1, whatever the strides say."""
    return x if x.stride(-1) == 1 else x.contiguous()
