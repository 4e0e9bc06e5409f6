"""Block attention: a query block over a key block, returning `(out, lse)`, and its backward.

Every exact strategy is built from these two calls. Shapes: `q` `[B, nq, H, D]`,
`k`/`v` `[B, nk, H_kv, D]` with `H % H_kv == 0` (GQA by head groups; K/V are never
repeated per query head). `lse` is `[B, H, nq]` in fp32 (fp64 for fp64 inputs).

The mask of a block is `offset`: `None` (every key visible) or an int (key j visible to
query i iff `j <= i + offset`). Fused kernels only know "no mask" and "square causal",
so `square_pieces` cuts any offset block into at most three such pieces, exactly.

The backward takes the *final* `out` and `lse` of the query rows (after all blocks were
merged): then `exp(s - lse)` are the global probabilities and the block's gradients are
its exact share of the dense gradients (the flash-attention backward identity).

Memory layout: every backend takes q, k, v, out and dO with any strides (`memory.py`).

NaN rule, every backend and block size: NaN in, NaN out in every row that depends on it.
A NaN in query row i makes output row i and its lse NaN; a NaN in key j makes every row
that sees key j NaN (out and lse); a NaN in value j makes the output of every row that
sees key j NaN. The merge keeps a NaN lse or output NaN. (A row that sees no key returns
zeros whatever its query holds; rows that do not see a NaN value may still come back NaN
when it shares their block, through 0 * NaN in the product with V, as in PyTorch's SDPA.)
PyTorch's CPU flash op breaks the rule by itself; `pieces.py` restores it.

This module is what the strategies call: `kernels(backend, q, k)` (the block kernels as
calls of the custom ops in ops.py, checked once per device and dtype) and
`merge_kernel(backend)`. The backends are the modules of `backends/` (one per backend,
with the registry, `resolve_backend` and the availability reasons in
`backends/__init__.py`); the names below re-export them and the shared pieces.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch

from . import ops
from .backends import BACKENDS, merge_kernel, resolve_backend, unavailable_reason, verify_once
from .backends.sdpa import backward as sdpa_backward, forward as sdpa_forward
from .backends.torch_math import backward as torch_backward, forward as torch_forward
from .memory import acc_dtype, empty_in_kernel_layout, heads_major, to_kernel_layout
from .pieces import square_pieces

__all__ = [
    "BACKENDS", "kernels", "merge_kernel", "resolve_backend", "unavailable_reason",
    "acc_dtype", "empty_in_kernel_layout", "heads_major", "to_kernel_layout", "square_pieces",
    "torch_forward", "torch_backward", "sdpa_forward", "sdpa_backward",
]

ForwardFn = Callable[..., Tuple[torch.Tensor, torch.Tensor]]
BackwardFn = Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def kernels(backend: str, q: torch.Tensor, k: torch.Tensor) -> Tuple[ForwardFn, BackwardFn]:
    """(forward, backward) of a concrete backend name, checked once per device and dtype.

    Both are calls of the custom ops `seqpar::block_forward` / `block_backward`
    (`kernels/ops.py`), which run the backend's functions and fix the outputs' dtype and
    layout, so that torch.compile traces each block as one op."""
    verify_once(backend, q)
    return ops.block_fns(backend)
