"""Star attention (arXiv 2411.17116): long-context inference in two phases.

Phase 1, context encoding (`star_attention`, approximate by design)
-------------------------------------------------------------------
The context is split contiguously: rank r holds positions `[s_r, s_r + n_r)`. With
`a = anchor_len` (at most rank 0's `n_0`, so the anchor lies inside rank 0's block):

    query t on rank r > 0:  keys [0, a) and [s_r, t]          query t on rank 0: keys [0, t]

A rank r > 0 merges two block results, (queries x anchor, no mask) and (queries x own
block, causal offset 0). Rank 0's own block already holds the anchor, so it computes only
its causal block and nothing is counted twice. Work per rank is `n_r (a + n_r / 2)`
query-key pairs, the same on every rank for equal blocks, where exact causal attention
over contiguous blocks costs the last rank `n_r (s_r + n_r / 2)`. With `P = 2` and
`a = n_0` the mask is exactly causal.

How the anchor's K/V reach the ranks (`e` = element size, per layer and call):
- broadcast (implemented): rank 0 broadcasts `k[:, :a], v[:, :a]`, `2 B a H_kv D e`
  bytes, which every other rank receives once (a chain forwards it once per rank). It is
  posted before the local causal block is computed and waited on after, so it overlaps
  that block. No extra compute; the ranks need only their own k, v, which is what this
  signature gives them.
- recomputation (what the paper's code does): every rank prepends the anchor *tokens* to
  its block and runs the whole layer on `a + n_r` tokens. No communication, but per layer
  `a` more tokens of projections and MLP, `a^2 / 2` more attention pairs (the anchor's own
  causal attention), activations for `a` more tokens, and the anchor's input tokens on
  every rank. It is a model-level choice, outside an attention call.

Backward: dq and the local dk, dv come from the two blocks (the flash identity with the
final out and lse, `kernels/block.py`). The anchor's share of dK/dV lives on ranks r > 0;
it is summed onto rank 0 (one reduce, `2 B a H_kv D` values in fp32, fp64 for fp64 inputs,
sent once by every rank r > 0) and added to rank 0's `dk[:, :a], dv[:, :a]`. So the
gradients equal autograd's through the phase-1 mask, for a loss that is the sum over ranks
of each rank's own loss (the usual meaning of a sharded output).

Phase 2, query (`star_query_attention`, exact)
----------------------------------------------
`q` `[B, n_q, H, D]` is the same on every rank; rank r holds the contiguous part
`[s_r, s_r + m_r)` of the global KV (M tokens in all; `m_r` may be 0). With `causal`,
query i sits at global position `M - n_q + i`, so rank r's block is causal with offset
`M - n_q - s_r` (key j visible iff `j <= i + offset`). Each rank attends q to its block,
giving `(out_r, lse_r)` (rows that see none of its keys: `lse_r = -inf`, `out_r = 0`),
and the partials are combined by two all-reduces instead of an all-gather:

    top = all_reduce_max(lse_r)                                  [B, H, n_q]
    w_r = exp(lse_r - top)                                       each <= 1, the largest is 1
    (O, W) = all_reduce_sum((w_r out_r, w_r))                    [B, n_q, H, D + 1]
    out = O / W,  lse = top + log W

Nothing overflows, and a row that no rank sees (causal, `n_q > M`) has `W = 0`: it gets
`out = 0`, `lse = -inf`. Accumulation is fp32 (fp64 for fp64 inputs), `c` bytes a value.
Volumes per rank (a ring all-reduce moves `2 (P-1)/P` of a tensor each way):

    forward, all-reduce form (this):  2 (P-1)/P * B n_q H (D + 2) c
        + (P-1) 8 bytes for every rank's `m_r` when `causal` and `kv_lens` is not given
    forward, all-gather form:         (P-1) * B n_q H (D + 1) c, then P merges per rank
    backward:                         2 (P-1)/P * B n_q H D c     (the dq all-reduce)

The all-reduce form sends about `2/P` of the all-gather's bytes: as much for P = 2 (D + 2
against D + 1), less from P = 3 on, and its per-rank volume does not grow with P.
`query_analytic_bytes` gives both exactly; the tests count them.

Backward of phase 2: `out` is replicated, and the upstream gradient is taken to be the
same on every rank (a replicated loss, as in decoding where every rank computes the same
logits). Then rank r's dk, dv are exact and local (its block's backward with the global
out and lse), and dq, the sum of every block's share, is all-reduced so that every rank
holds the full dq.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from ..call import (check_tensors, collective_call, grad_wanted, group_of, layout_for, no_seq, resolve_scale,
                    values_digest)
from ..comm import collectives
from ..comm.groups import describe
from ..kernels import block as block_kernels
from ..layout import Block, SeqLayout, group_rank_and_size
from .common import attend_blocks, attend_blocks_backward, saved_output_function
from ..errors import brief


def _accumulator_size(element_size: int) -> int:
    return 8 if element_size == 8 else 4


# -- phase 1: context encoding -------------------------------------------------------


class _Anchor:
    """Rank 0's first `length` K/V rows, broadcast to every rank: posted at construction,
    waited on by `wait()`."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, length: int, layout: SeqLayout):
        self.length = length
        if layout.rank == 0:
            self.buffer = torch.stack([k[:, :length].detach(), v[:, :length].detach()])
        else:
            b, _, h_kv, d = k.shape
            self.buffer = k.new_empty((2, b, length, h_kv, d))
        self.handle = collectives.broadcast(self.buffer, 0, layout.group, op="star.context.anchor", async_op=True)

    def wait(self):
        """(k, v) of the anchor, each `[B, a, H_kv, D]`."""
        if self.handle is not None:
            self.handle.wait()
            self.handle = None
        return self.buffer[0], self.buffer[1]


def _context_forward(q, k, v, anchor: Optional[_Anchor], layout: SeqLayout, scale: float, backend: str):
    """q, k, v contiguous; returns (out [B, n, H, D], lse [B, H, n]) in the acc dtype."""
    fwd, _ = block_kernels.kernels(backend, q, k)
    acc = block_kernels.acc_dtype(q.dtype)
    b, n, h, d = q.shape
    out = torch.empty((b, n, h, d), dtype=acc, device=q.device)
    # fp64 lse across the merge, as in ring: saturated rows amplify its rounding in the gradients
    lse = torch.empty((b, h, n), dtype=torch.float64, device=q.device)
    attend_blocks(fwd, q, k, v, [Block(0, n, 0, n, 0)], scale, out, lse, fresh=True)
    if anchor is not None:
        anchor_k, anchor_v = anchor.wait()  # rank 0 waits too: its send must complete
        if layout.rank > 0:
            attend_blocks(fwd, q, anchor_k, anchor_v, [Block(0, n, 0, anchor.length, None)], scale, out, lse)
    return out, lse.to(acc)


def _context_backward(do, q, k, v, out, lse, anchor: Optional[_Anchor], layout: SeqLayout, scale: float,
                      backend: str):
    _, bwd = block_kernels.kernels(backend, q, k)
    acc = block_kernels.acc_dtype(q.dtype)
    n = q.shape[1]
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    attend_blocks_backward(bwd, [Block(0, n, 0, n, 0)], do, q, k, v, out, lse, scale, dq, dk, dv)
    if anchor is None:
        return dq, dk, dv
    anchor_k, anchor_v = anchor.wait()
    # [2, B, a, H_kv, D]: the anchor's dK, dV from this rank's queries (rank 0: none)
    anchor_grad = torch.zeros((2,) + tuple(anchor_k.shape), dtype=acc, device=q.device)
    if layout.rank > 0:
        attend_blocks_backward(bwd, [Block(0, n, 0, anchor.length, None)], do, q, anchor_k, anchor_v, out, lse,
                               scale, dq, anchor_grad[0], anchor_grad[1])
    collectives.reduce_sum(anchor_grad, 0, layout.group, op="star.context.backward.anchor")
    if layout.rank == 0:
        dk[:, :anchor.length] += anchor_grad[0]
        dv[:, :anchor.length] += anchor_grad[1]
    return dq, dk, dv


StarContextAttention = saved_output_function("StarContextAttention", _context_forward, _context_backward)


def context_analytic_bytes(layout: SeqLayout, batch: int, kv_heads: int, head_dim: int, element_size: int,
                           anchor_len: int) -> Dict[str, int]:
    """Bytes this rank of `layout` sends in one phase-1 forward and backward, exactly."""
    if layout.world_size == 1 or anchor_len == 0:
        return {"forward": 0, "backward": 0}
    anchor = 2 * batch * anchor_len * kv_heads * head_dim
    # the broadcast chain 0 -> 1 -> ... -> P-1; the reduce runs it backwards into rank 0
    forward = 0 if layout.rank == layout.world_size - 1 else anchor * element_size
    backward = 0 if layout.rank == 0 else anchor * _accumulator_size(element_size)
    return {"forward": forward, "backward": backward}


def star_attention(q, k, v, *, layout=None, anchor_len: int, softmax_scale=None, backend="auto"):
    """Star attention, phase 1 (context encoding): blockwise causal attention plus an anchor.

    `q` `[B, n_r, H, D]`, `k`/`v` `[B, n_r, H_kv, D]` (`H % H_kv == 0`): this rank's
    contiguous block of `layout` (scheme "contiguous"; default: equal blocks on the default
    group). A query at global position t on a rank whose block starts at s attends causally
    to keys `[0, anchor_len)` and `[s, t]`; on rank 0 that is plain causal attention.
    `anchor_len`: an int in `[0, n_0]`, n_0 = rank 0's `local_len` (0: no anchor).
    `softmax_scale` defaults to `D ** -0.5`; `backend` as in `seqpar.attention`. Returns
    `[B, n_r, H, D]` in the input dtype. Approximate by design (exact for P = 1, and for
    P = 2 with `anchor_len = n_0`). Communication: one broadcast of rank 0's first
    `anchor_len` K/V rows per call. Differentiable in q, k, v (the anchor's K/V gradient
    is reduced onto rank 0); the backward is collective like the forward.
    """
    group = group_of(layout)

    def check():
        check_tensors(q, k, v)
        local = layout_for(layout, q, group)
        if local.scheme != "contiguous":
            raise ValueError(
                f"layout: expected scheme 'contiguous' (Star attention splits the context into contiguous "
                f"blocks), got {local.scheme!r}"
            )
        if local.documents is not None:
            raise ValueError(f"layout: star_attention does not take documents (cu_seqlens), got a layout with "
                             f"{len(local.documents) - 1}")
        if isinstance(anchor_len, bool) or not isinstance(anchor_len, int):
            raise TypeError(f"anchor_len: expected an int, got {type(anchor_len).__name__}")
        if not 0 <= anchor_len <= local.local_len_of(0):
            raise ValueError(
                f"anchor_len: expected an int in [0, {local.local_len_of(0)}] (at most rank 0's local_len), "
                f"got {anchor_len}"
            )
        scale = resolve_scale(softmax_scale, q.shape[-1])
        concrete = block_kernels.resolve_backend(backend, q.device, q.dtype, q.shape[-1], scale)
        block_kernels.verify_once(concrete, q)  # before any collective
        return local, scale, concrete

    def signature(resolved):
        local = layout if resolved is None else resolved[0]
        return (
            ("q [batch, heads, head_dim], dtype, device", no_seq(q)),
            ("k [batch, heads, head_dim], dtype, device", no_seq(k)),
            ("v [batch, heads, head_dim], dtype, device", no_seq(v)),
            ("seq_len", getattr(local, "seq_len", None)),
            ("scheme", getattr(local, "scheme", None)),
            ("anchor_len", describe(anchor_len)),
            ("backend", describe(backend)),
            # kernels that are installed on some ranks only would give the ranks different
            # buffer layouts and numbers: the backend each rank resolved must be one
            ("backend resolved on this rank", resolved and resolved[2]),
            ("softmax_scale", resolved and resolved[1]),
            # a backward on some ranks only would wait in the anchor's dK/dV reduce
            ("gradients required (q, k or v requires grad, grad mode on)", grad_wanted(q, k, v)),
        )

    layout, scale, concrete_backend = collective_call(group, "seqpar.star_attention", check, signature)
    world = layout.world_size
    anchor = _Anchor(k, v, anchor_len, layout) if world > 1 and anchor_len > 0 else None
    q_k, k_k, v_k = (t.contiguous() for t in (q, k, v))
    out = StarContextAttention.apply(q_k, k_k, v_k, None, (anchor, layout, scale, concrete_backend))
    return out.contiguous()


# -- phase 2: query ---------------------------------------------------------------------


def _query_blocks(kv_lens: Sequence[int], rank: int, n_q: int, causal: bool) -> List[Block]:
    """The block of (every query) x (rank `rank`'s keys), or none when it holds no key."""
    m = kv_lens[rank]
    if m == 0:
        return []
    if not causal:
        return [Block(0, n_q, 0, m, None)]
    offset = sum(kv_lens) - n_q - sum(kv_lens[:rank])
    # the last query (position M - 1) sees every key, so no block is ever fully masked
    return [Block(0, n_q, 0, m, None if offset >= m - 1 else offset)]


def _query_forward(q, k, v, blocks: List[Block], group, world: int, scale: float, backend: str):
    """Returns the global (out [B, n_q, H, D], lse [B, H, n_q]) on every rank, acc dtype."""
    fwd, _ = block_kernels.kernels(backend, q, k)
    acc = block_kernels.acc_dtype(q.dtype)
    b, n, h, d = q.shape
    out = torch.empty((b, n, h, d), dtype=acc, device=q.device)
    lse = torch.empty((b, h, n), dtype=acc, device=q.device)
    if attend_blocks(fwd, q, k, v, blocks, scale, out, lse, fresh=True):
        out.zero_()  # no key here: the -inf/0 convention, weight 0 below
        lse.fill_(float("-inf"))
    if world == 1:
        return out, lse
    top = lse.clone()
    collectives.all_reduce_max(top, group, op="star.query.max")
    # a row that no rank sees has top = -inf: shift by 0 instead, every weight is then 0
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    weight = torch.exp(lse - top).transpose(1, 2).unsqueeze(-1)  # [B, n, H, 1]
    packed = torch.cat([out * weight, weight], dim=-1)  # [B, n, H, D + 1]: one all-reduce
    collectives.all_reduce_sum(packed, group, op="star.query.sum")
    total = packed[..., d:]
    out = (packed[..., :d] / torch.where(total > 0, total, torch.ones_like(total))).contiguous()
    lse = top + torch.log(total.squeeze(-1)).transpose(1, 2)
    return out, lse


def _query_backward(do, q, k, v, out, lse, blocks: List[Block], group, world: int, scale: float, backend: str):
    _, bwd = block_kernels.kernels(backend, q, k)
    acc = block_kernels.acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    attend_blocks_backward(bwd, blocks, do, q, k, v, out, lse, scale, dq, dk, dv)
    if world > 1:
        collectives.all_reduce_sum(dq, group, op="star.query.backward.dq")
    return dq, dk, dv


StarQueryAttention = saved_output_function("StarQueryAttention", _query_forward, _query_backward)


def query_analytic_bytes(world_size: int, batch: int, n_q: int, heads: int, head_dim: int, element_size: int, *,
                         causal: bool = True, kv_lens_given: bool = False) -> Dict[str, int]:
    """Bytes a rank sends in one phase-2 forward and backward, exactly, and what the
    all-gather form of the forward would send (`allgather_forward`)."""
    if world_size == 1:
        return {"forward": 0, "backward": 0, "allgather_forward": 0}
    c = _accumulator_size(element_size)
    rows = batch * n_q * heads

    def all_reduce(nbytes: int) -> int:
        return 2 * (world_size - 1) * nbytes // world_size

    lens = (world_size - 1) * 8 if causal and not kv_lens_given else 0
    return {
        "forward": all_reduce(rows * c) + all_reduce(rows * (head_dim + 1) * c) + lens,
        "backward": all_reduce(rows * head_dim * c),
        "allgather_forward": (world_size - 1) * rows * (head_dim + 1) * c,
    }


def _check_kv_lens(kv_lens, world: int, rank: int, m: int) -> tuple:
    if not isinstance(kv_lens, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, int) for x in kv_lens):
        raise TypeError(f"kv_lens: expected a list of ints or None, got {brief(kv_lens)}")
    if len(kv_lens) != world or min(kv_lens) < 0:
        raise ValueError(f"kv_lens: expected {world} non-negative ints (one per rank), got {list(kv_lens)}")
    if kv_lens[rank] != m:
        raise ValueError(f"kv_lens: expected entry {rank} to be this rank's KV length {m}, got {kv_lens[rank]}")
    return tuple(kv_lens)


def star_query_attention(q, k, v, *, group=None, causal=True, softmax_scale=None, backend="auto",
                         kv_lens: Optional[Sequence[int]] = None):
    """Star attention, phase 2 (query): exact attention of replicated queries over a KV
    sequence split across the ranks of `group`.

    `q` `[B, n_q, H, D]`, the same on every rank, bit for bit (a checksum of its bits is
    agreed on every call: a q computed with different rounding on one rank raises); `k`/`v` `[B, m_r, H_kv, D]`, rank r's
    contiguous part of the global KV (ranks in order; `m_r` may differ and may be 0).
    Returns `[B, n_q, H, D]` (input dtype) on every rank: attention of q over all M keys.
    `causal=True` (default) places query i at global position `M - n_q + i`; rows before
    position 0 see no key and return 0. `softmax_scale` defaults to `D ** -0.5`.
    `kv_lens`: every rank's `m_r` in rank order, if the caller knows them (a KV cache
    does); it saves the all-gather of the lengths that a causal call makes otherwise.
    Partials are combined by an all-reduce of the max lse and one of the weighted outputs
    (volumes in the module docstring). Differentiable: dk, dv are local, dq is all-reduced,
    assuming the upstream gradient is the same on every rank (a replicated loss).
    """
    return _query_call(q, k, v, group=group, causal=causal, softmax_scale=softmax_scale, backend=backend,
                       kv_lens=kv_lens)


def _query_call(q, k, v, *, group, causal, softmax_scale, backend, kv_lens, prior_error=None, prior_signature=()):
    """`star_query_attention`, with a caller's own check folded into the cross-rank
    agreement: `prior_error` (this rank's failed check, or None) raises on every rank,
    and `prior_signature` fields must match across ranks (the KV cache's decode step)."""
    rank, world = group_rank_and_size(group)

    def check():
        check_tensors(q, k, v, same_seqlen=False)
        if not isinstance(causal, bool):
            raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
        scale = resolve_scale(softmax_scale, q.shape[-1])
        concrete = block_kernels.resolve_backend(backend, q.device, q.dtype, q.shape[-1], scale)
        block_kernels.verify_once(concrete, q)  # before any collective
        lens = None if kv_lens is None else _check_kv_lens(kv_lens, world, rank, k.shape[1])
        return scale, concrete, lens

    def signature(resolved):
        return tuple(prior_signature) + (
            ("q [batch, n_q, heads, head_dim], dtype, device", describe(q)),
            # the queries are replicated: a rank with other values would make every rank's
            # output a wrong mixture of the two, silently (checked every call; q is small)
            ("q (its values)", None if resolved is None else values_digest(q)),
            ("k [batch, heads, head_dim], dtype, device", no_seq(k)),
            ("v [batch, heads, head_dim], dtype, device", no_seq(v)),
            ("causal", describe(causal)),
            ("backend", describe(backend)),
            ("backend resolved on this rank", resolved and resolved[1]),
            ("softmax_scale", resolved and resolved[0]),
            ("kv_lens", describe(kv_lens) if resolved is None or resolved[2] is None else resolved[2]),
            # a backward on some ranks only would wait in the dq all-reduce
            ("gradients required (q, k or v requires grad, grad mode on)", grad_wanted(q, k, v)),
        )

    scale, concrete_backend, kv_lens = collective_call(group, "seqpar.star_query_attention", check, signature,
                                                       prior_error=prior_error)
    if kv_lens is None:
        if causal and world > 1:
            mine = torch.tensor([k.shape[1]], dtype=torch.int64, device=collectives.device_of(group))
            shards = collectives.all_gather_uneven(mine, [1] * world, group, op="star.query.lens")
            kv_lens = [int(t.item()) for t in shards]
        else:
            kv_lens = [k.shape[1] if r == rank else 0 for r in range(world)]  # only the own entry is read
    blocks = _query_blocks(kv_lens, rank, q.shape[1], causal)
    return StarQueryAttention.apply(q, k, v, None, (blocks, group, world, scale, concrete_backend))
