"""Block attention: a query block over a key block, returning `(out, lse)`, and its backward.

Every exact strategy is built from these two calls. Shapes: `q` `[B, nq, H, D]`,
`k` `[B, nk, H_kv, D]`, `v` `[B, nk, H_kv, Dv]` with `H % H_kv == 0` (GQA by head groups;
K/V are never repeated per query head); `out` is `[B, nq, H, Dv]`. `lse` is `[B, H, nq]`
in fp32 (fp64 for fp64 inputs).

A value head dim of its own (MLA: D = 192, Dv = 128) reaches the backends that take it
(`VALUE_DIM`: the torch math); for the others the block pads the smaller of the two head
dims with zeros to the larger, which changes no score and no output column, and drops the
padded columns of the results (`_forward_of`/`_backward_of`): exact, at the cost of
the padded arithmetic.

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
calls of the custom ops below, checked once per device and dtype) and
`merge_kernel(backend)`. The backends are the modules of `backends/` (one per backend,
with the registry, `resolve_backend` and the availability reasons in
`backends/__init__.py`); the names below re-export them and the shared pieces.

## The custom ops

Block attention and the merge are `torch.library` custom ops, so torch.compile traces them.

Ops (namespace `seqpar`):

- `torch.ops.seqpar.block_forward(q, k, v, scale, offset, backend) -> (out, lse)`
- `torch.ops.seqpar.block_backward(do, q, k, v, out, lse, scale, offset, backend) -> (dq, dk, dv)`
- `torch.ops.seqpar.merge_(out, lse, part_out, part_lse) -> ()`, in place on out and lse
  (defined with backend "cuda", whose merge it is, in `backends/cuda.py`; `block.merge_` here)

`offset` is the block's causal offset (`None`: no mask; int: key j visible to query i iff
`j <= i + offset`), `backend` a concrete block backend name (`backends.MODULES`). Each op
runs that backend's plain function; what the op adds is a fixed output contract, which
its fake (meta) implementation states without running anything:

- `out` `[B, nq, H, Dv]` and `dq`/`dk`/`dv` (shapes of q/k/v) in the accumulation dtype
  (fp32; fp64 for fp64 inputs), contiguous;
- `lse` `[B, H, nq]` contiguous, accumulation dtype.

Backends return other dtypes or strides in places (the fused ops' bf16 outputs, the
CPU op's `out` for a q of other strides); the ops copy those into the contract, because
compiled code indexes outputs by the strides the fake promised.

`block_forward` has an autograd formula, exact also for the gradient of `lse` (see
`_block_forward_backward`); the strategies do not need it (their autograd functions call
`block_backward` themselves), it makes the op usable on its own. `block_backward` and
`merge_` have none: they are used under no-grad inside the strategies' backward and
forward, and `merge_` mutates its accumulator.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .backends import BACKENDS, merge_kernel, resolve_backend, unavailable_reason, verify_once
from .backends.sdpa import backward as sdpa_backward, forward as sdpa_forward
from .backends.torch_math import backward as torch_backward, forward as torch_forward
from .backends.cuda import merge as merge_  # noqa: F401  (the op seqpar::merge_)
from .memory import acc_dtype
from .pieces import band_backward, band_forward, square_pieces

__all__ = [
    "BACKENDS", "kernels", "merge_kernel", "resolve_backend", "unavailable_reason", "verify_once",
    "acc_dtype",
    "square_pieces",
    "torch_forward", "torch_backward", "sdpa_forward", "sdpa_backward",
]

ForwardFn = Callable[..., Tuple[torch.Tensor, torch.Tensor]]
BackwardFn = Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def kernels(backend: str, q: torch.Tensor, k: torch.Tensor) -> Tuple[ForwardFn, BackwardFn]:
    """(forward, backward) of a concrete backend name, checked once per device and dtype.

    Both are calls of the custom ops `seqpar::block_forward` / `block_backward`
    (below), which run the backend's functions and fix the outputs' dtype and layout, so
    that torch.compile traces each block as one op."""
    verify_once(backend, q)
    return block_fns(backend)


# -- the custom ops ---------------------------------------------------------------------

def _pad_last(x: Tensor, width: int) -> Tensor:
    """`x` with zero columns appended to its last dim up to `width`."""
    return x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def _forward_of(backend: str, q, k, v, scale, offset, lo, softcap):
    """The backend's forward of one block; a window's lower bound `lo` natively where the
    backend takes it (`BANDS`), else cut into one-sided blocks (`pieces.band_forward`).
    `softcap` reaches only backends that take it (`SOFTCAP`; `resolve_backend` picks one).
    A value head dim other than q's is padded to one head dim where the backend does not
    take it (`VALUE_DIM`): zero key columns change no score, zero value columns only add
    output columns, which are dropped."""
    module = backends.get(backend)
    d, dv = q.shape[-1], v.shape[-1]
    if d != dv and not getattr(module, "VALUE_DIM", False):
        width = max(d, dv)
        out, lse = _forward_of(backend, _pad_last(q, width), _pad_last(k, width), _pad_last(v, width), scale,
                               offset, lo, softcap)
        return out[..., :dv], lse
    if softcap:
        if lo is None or getattr(module, "BANDS", False):
            return module.forward(q, k, v, scale, offset, lo, softcap)
        # the capped scores are elementwise: the band's pieces cap theirs alike
        return band_forward(lambda *a: module.forward(*a, softcap=softcap), q, k, v, scale, offset, lo)
    if lo is None:
        return module.forward(q, k, v, scale, offset)
    if getattr(module, "BANDS", False):
        return module.forward(q, k, v, scale, offset, lo)
    return band_forward(module.forward, q, k, v, scale, offset, lo)


def _backward_of(backend: str, do, q, k, v, out, lse, scale, offset, lo, softcap):
    module = backends.get(backend)
    d, dv = q.shape[-1], v.shape[-1]
    if d != dv and not getattr(module, "VALUE_DIM", False):
        # as in `_forward_of`: the padded columns of dO and out are zeros, so rowsum(dO * O)
        # and dO . v are unchanged, and the padded columns of the gradients are dropped
        width = max(d, dv)
        dq, dk, dv_ = _backward_of(backend, _pad_last(do, width), _pad_last(q, width), _pad_last(k, width),
                                   _pad_last(v, width), _pad_last(out, width), lse, scale, offset, lo, softcap)
        return dq[..., :d], dk[..., :d], dv_[..., :dv]
    takes = getattr(module, "takes_precise_out", None)
    if out.dtype != q.dtype and not (takes is not None and takes(q.device)):
        # a more precise `out` (kept with sinks) reaches the kernels that take it; the
        # fused GPU kernels want the input dtype
        out = out.to(q.dtype)
    if softcap:
        if lo is None or getattr(module, "BANDS", False):
            return module.backward(do, q, k, v, out, lse, scale, offset, lo, softcap)
        return band_backward(lambda *a: module.backward(*a, softcap=softcap), do, q, k, v, out, lse, scale, offset,
                             lo)
    if lo is None:
        return module.backward(do, q, k, v, out, lse, scale, offset)
    if getattr(module, "BANDS", False):
        return module.backward(do, q, k, v, out, lse, scale, offset, lo)
    return band_backward(module.backward, do, q, k, v, out, lse, scale, offset, lo)


def _in_contract(x: Tensor, acc: torch.dtype) -> Tensor:
    """`x` if it already has the dtype and layout the fake promises (contiguous; strides of
    size-1 dims, which address nothing, may differ), else a copy that has."""
    if x.dtype == acc and x.is_contiguous():
        return x
    # one copy, converting on the way (`x.to(memory_format=...)` keeps a 4-D tensor's
    # strides when its suggested format is already the contiguous one)
    return torch.empty(x.shape, dtype=acc, device=x.device).copy_(x)


# -- block forward --------------------------------------------------------------------

@torch.library.custom_op("seqpar::block_forward", mutates_args=())
def block_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, offset: Optional[int],
                  backend: str, lo: Optional[int] = None, softcap: float = 0.0) -> Tuple[Tensor, Tensor]:
    out, lse = _forward_of(backend, q, k, v, scale, offset, lo, softcap)
    acc = acc_dtype(q.dtype)
    out = _in_contract(out, acc)
    return out, lse.to(acc).contiguous()


@block_forward.register_fake
def _block_forward_fake(q, k, v, scale, offset, backend, lo=None, softcap=0.0):
    acc = acc_dtype(q.dtype)
    b, nq, h, _ = q.shape
    out = q.new_empty((b, nq, h, v.shape[-1]), dtype=acc)
    return out, q.new_empty((b, h, nq), dtype=acc)


def _block_forward_setup(ctx, inputs, output):
    q, k, v, scale, offset, backend, lo, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.offset, ctx.backend, ctx.lo, ctx.softcap = scale, offset, backend, lo, softcap
    # an lse nobody differentiates arrives as None, not as zeros: no extra kernels then
    ctx.set_materialize_grads(False)


def _block_forward_backward(ctx, grad_out, grad_lse):
    """Gradients of `(out, lse)` of one block.

    `out`: the flash backward (`block_backward`) with the block's own out and lse.
    `lse`: with P the block's probabilities and g = dL/dlse `[B, H, nq]`,
    `dlse_i/dq_i = scale * (P k)_i` and `dlse_i/dk_j = scale * P_ij q_i`, so
    `dq += scale * g * (P K)` (P K: a forward with k as the values) and
    `dk += P^T (scale * g * q)` (the dv of a backward whose dO is `scale * g * q`).
    """
    q, k, v, out, lse = ctx.saved_tensors
    scale, offset, backend, lo, softcap = ctx.scale, ctx.offset, ctx.backend, ctx.lo, ctx.softcap
    acc = acc_dtype(q.dtype)
    out_q = out.to(q.dtype)
    dq = dk = dv = None
    if grad_out is not None:
        dq, dk, dv = block_backward(grad_out.to(q.dtype), q, k, v, out_q, lse, scale, offset, backend, lo, softcap)
    if grad_lse is not None:
        if softcap:
            # the P K trick below has no tanh' factor; the strategies never differentiate lse
            raise RuntimeError("seqpar::block_forward: the gradient of lse with softcap > 0 is not supported "
                               "(differentiate out only)")
        # [B, H, nq] -> [B, nq, H, 1]
        g = grad_lse.to(acc).transpose(1, 2).unsqueeze(-1) * scale
        pk, _ = block_forward(q, k, k, scale, offset, backend, lo)
        dq_lse = g * pk
        _, _, dk_lse = block_backward((g * q.to(acc)).to(q.dtype), q, k, k, out_q, lse, scale, offset, backend,
                                      lo)
        dq = dq_lse if dq is None else dq + dq_lse
        dk = dk_lse if dk is None else dk + dk_lse
    grads = tuple(None if t is None else t.to(ref.dtype) for t, ref in ((dq, q), (dk, k), (dv, v)))
    return grads + (None, None, None, None, None)


block_forward.register_autograd(_block_forward_backward, setup_context=_block_forward_setup)


# -- block backward -------------------------------------------------------------------

@torch.library.custom_op("seqpar::block_backward", mutates_args=())
def block_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                   offset: Optional[int], backend: str, lo: Optional[int] = None,
                   softcap: float = 0.0) -> Tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _backward_of(backend, do, q, k, v, out, lse, scale, offset, lo, softcap)
    acc = acc_dtype(q.dtype)
    return tuple(_in_contract(g, acc) for g in (dq, dk, dv))


@block_backward.register_fake
def _block_backward_fake(do, q, k, v, out, lse, scale, offset, backend, lo=None, softcap=0.0):
    acc = acc_dtype(q.dtype)
    return tuple(q.new_empty(ref.shape, dtype=acc) for ref in (q, k, v))


# -- what the strategies call ---------------------------------------------------------

def block_fns(backend: str) -> Tuple[Callable, Callable]:
    """`(forward, backward)` with the signatures of the backends' functions
    (`fwd(q, k, v, scale, offset, lo=None)`, `bwd(do, q, k, v, out, lse, scale, offset,
    lo=None)`), each one call of the custom op for `backend`."""
    backends.get(backend)  # ValueError for a name that is no concrete backend

    def forward(q, k, v, scale, offset, lo=None, softcap=0.0):
        return torch.ops.seqpar.block_forward(q, k, v, float(scale), offset, backend, lo, float(softcap))

    def backward(do, q, k, v, out, lse, scale, offset, lo=None, softcap=0.0):
        return torch.ops.seqpar.block_backward(do, q, k, v, out, lse, float(scale), offset, backend, lo,
                                               float(softcap))

    return forward, backward
