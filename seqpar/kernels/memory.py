"""Memory layout and accumulation dtype of the block kernels' tensors (imports no backend).

Every backend takes q, k, v, out and dO with any strides. PyTorch's fused flash ops (CPU
and CUDA) and flash-attn read the head dim as if its stride were 1 (a `x[..., ::2]` view
or a `[B, n, D, H]` buffer seen as `[B, n, H, D]` came back as garbage), so their pieces
copy exactly the tensors whose `stride(-1) != 1` (`unit_stride`), once; the common
layouts pay nothing. Outputs and gradients of a block come back in `acc_dtype` (fp32; fp64
for fp64 inputs), in the layout the backend prefers (`empty_in_kernel_layout`).
"""
from __future__ import annotations

import math

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit_stride(x: torch.Tensor) -> torch.Tensor:
    """`x` when its last dim has stride 1, else a contiguous copy: the fused flash ops and
    flash-attn index the head dim as if stride(-1) were 1, whatever the strides say."""
    return x if x.stride(-1) == 1 else x.contiguous()


def heads_major(backend: str) -> bool:
    """Whether `backend` runs fastest on `[B, H, n, D]`-contiguous memory (measured: the
    CPU flash op is 5-10% faster on it than on `[B, n, H, D]`), else on `[B, n, H, D]`.
    Triton takes any strides; it is given `[B, n, H, D]` (flash-attn's layout), where a
    tile of rows of one head reads D contiguous elements per row."""
    return backend == "sdpa"


def view_in_kernel_layout(flat: torch.Tensor, shape, backend: str) -> torch.Tensor:
    """The contiguous 1-D `flat` (exactly `prod(shape)` elements) viewed as `[..., n, H, D]`
    in the memory layout `backend` prefers (`empty_in_kernel_layout`'s view)."""
    shape = tuple(shape)
    if heads_major(backend):
        return flat.view(shape[:-3] + (shape[-2], shape[-3], shape[-1])).transpose(-3, -2)
    return flat.view(shape)


def to_kernel_layout(x: torch.Tensor, backend: str) -> torch.Tensor:
    """`x` `[..., n, H, D]` copied (if needed) into the memory layout `backend` prefers;
    the shape stays `[..., n, H, D]`, only strides change."""
    if heads_major(backend):
        return x.transpose(-3, -2).contiguous().transpose(-3, -2)
    return x.contiguous()


def empty_in_kernel_layout(shape, backend: str, **kwargs):
    """(storage, view): flat contiguous storage for communication, and its `[..., n, H, D]`
    view in the layout `backend` prefers (`view_in_kernel_layout`)."""
    shape = tuple(shape)
    storage = torch.empty(math.prod(shape), **kwargs)
    return storage, view_in_kernel_layout(storage, shape, backend)
