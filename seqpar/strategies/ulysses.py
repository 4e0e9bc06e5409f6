"""Ulysses (arXiv 2309.14509): trade the sequence shard for a head shard, attend, trade back.

Within a group of U ranks, one all-to-all turns `[B, n_r, H, D]` (this rank's tokens, every
head) into `[B, n_group, H/U, D]` (every token of the group, this rank's head chunk); q, k
and v travel in that one all-to-all. The tokens land in the group's storage order (see
`GroupLayout`: sorted global order whenever the group's positions form a few runs), so
masks follow global positions for every scheme and uneven lengths. Attention over the
gathered tokens is the ring loop over a ring of the *groups* (USP) or, for plain Ulysses
(U = P), a ring of one member with no communication. A second all-to-all returns the
output. The backward is the transpose: dO travels like q; dQ, dK, dV travel back like
the output (in the input dtype), and replicated KV heads sum their gradients on return.

KV heads (G = H / H_kv query heads per KV head):
- `H_kv % U == 0`: member j receives KV heads `[j H_kv/U, (j+1) H_kv/U)`, exactly those its
  query heads `[j H/U, (j+1) H/U)` use.
- `U % H_kv == 0`: member j's query heads all use KV head `j // (U / H_kv)`; it receives
  that one head, so each KV head goes to the U/H_kv members that need it and no further.

Volume per rank (elements; `n_j` = tokens of member j, `h_q = H/U`, `h_kv` = KV heads per
member, `e` the element size; sums over the other members j != me):
    forward:  in  sum_j B n_me (h_q + 2 h_kv) D   (q, k, v)
              out sum_j B n_j  h_q D             (the output back)
    backward: in  sum_j B n_me h_q D             (dO)
              out sum_j B n_j (h_q + 2 h_kv) D   (dQ, dK, dV back)
With equal lengths and U = P: forward `B (N/P) D (2H + 2H_kv') (P-1)/P` with
`H_kv' = max(H_kv, P)` (replicated heads count once per receiver).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..comm.alltoall import all_to_all_rows, split_rows
from ..layout import GroupLayout, SeqLayout
from ..registry import Strategy, register, run
from . import ring
from .common import fold_sinks, sinks_grad


def kv_heads_per_member(heads: int, kv_heads: int, size: int) -> int:
    if kv_heads % size == 0:
        return kv_heads // size
    if size % kv_heads == 0:
        return 1
    raise ValueError(
        f"k: Ulysses over {size} ranks needs KV heads divisible by {size} or dividing it, got {kv_heads}"
    )


def ulysses_groups(world: int, size: int) -> List[List[int]]:
    """The Ulysses groups of `size` neighbouring ranks (USP's inner level; size = P: one)."""
    return [list(range(g * size, (g + 1) * size)) for g in range(world // size)]


def head_constraint(heads: int, kv_heads: int, size: int, strategy: str):
    """The reason `strategy` cannot split heads over `size` ranks, or None."""
    if heads % size:
        return (
            f"{strategy}: query heads ({heads}) must be divisible by the Ulysses size ({size}); "
            f"strategy='usp' with a smaller ulysses_size, or 'ring' / 'allgather', can serve this"
        )
    if kv_heads % size and size % kv_heads:
        return (
            f"{strategy}: KV heads ({kv_heads}) must divide or be divisible by the Ulysses size ({size}); "
            f"strategy='usp' with another ulysses_size, or 'ring' / 'allgather', can serve this"
        )
    return None


def _index_runs(index: torch.Tensor, limit: int = 16):
    """`index` (member row i -> storage row index[i]) as runs `(first member row, first
    storage row, length)` of consecutive rows, or None beyond `limit` runs."""
    if index.numel() == 0:
        return []
    breaks = (torch.nonzero(index[1:] - index[:-1] != 1).flatten() + 1).tolist()
    if len(breaks) >= limit:
        return None
    starts = [0] + breaks
    ends = breaks + [index.numel()]
    return [(a, int(index[a]), e - a) for a, e in zip(starts, ends)]


def _offsets(lengths: Sequence[int]) -> List[int]:
    out, total = [], 0
    for n in lengths:
        out.append(total)
        total += n
    return out


class HeadScatter:
    """The two all-to-alls of one Ulysses group: sequence-sharded <-> head-sharded."""

    def __init__(self, layout: SeqLayout, members: Sequence[int], me: int, group, ring_layout: GroupLayout,
                 heads: int, kv_heads: int):
        self.group, self.me, self.size = group, me, len(members)
        # a Ulysses group smaller than the layout's group exchanges by p2p among its members
        self.members = None if len(members) == layout.world_size else list(members)
        self.rows = [layout.local_len_of(m) for m in members]
        self.index = [ring_layout.local_index(m) for m in members]
        # the same maps as runs of consecutive rows (zigzag: two per member), copied by slices,
        # which is several times faster than index_copy_/index_select on strided tensors
        self.runs = [_index_runs(index) for index in self.index]
        self.n_group = ring_layout.local_len
        self.hq = heads // self.size
        self.hkv = kv_heads_per_member(heads, kv_heads, self.size)
        self.kv_split = kv_heads % self.size == 0
        # the KV head each member receives when heads are replicated
        self.kv_head_of = torch.tensor([j // (self.size // kv_heads) for j in range(self.size)]) if not self.kv_split else None

    def _per_member(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """[B, n, H_x, D] -> [U, n, B, h, D]: the head chunk for each member."""
        b, n, h, d = x.shape
        if kind == "q" or self.kv_split:
            chunks = x.reshape(b, n, self.size, h // self.size, d)
        else:
            chunks = x.index_select(2, self.kv_head_of.to(x.device)).unsqueeze(3)
        return chunks.permute(2, 1, 0, 3, 4)

    def to_heads(self, tensors: Sequence[Tuple[torch.Tensor, str]], op: str) -> List[torch.Tensor]:
        """Sequence shards -> head shards over the group's tokens, contiguous.
        The tensors travel in one all-to-all, each token's heads x head dim flattened, so
        that they may differ in head dim (v's own, in MLA)."""
        b = tensors[0][0].shape[0]
        shapes = [(self.hq if kind == "q" else self.hkv, t.shape[3]) for t, kind in tensors]
        rows_me = self.rows[self.me]
        send = torch.cat([self._per_member(t, kind).reshape(self.size, rows_me, b, h * d)
                          for (t, kind), (h, d) in zip(tensors, shapes)], dim=3)
        send = send.reshape(self.size * rows_me, b, send.shape[3])
        recv = all_to_all_rows(send, [rows_me] * self.size, self.rows, self.group, op, self.members)
        del send  # what arrived is all that is needed now
        if len(tensors) == 1 or len(set(d for _, d in shapes)) == 1:
            # one head dim: one buffer, one copy per member, the tensors' heads side by side
            d = shapes[0][1]
            hc = sum(h for h, _ in shapes)
            full = torch.empty((b, self.n_group, hc, d), dtype=recv.dtype, device=recv.device)
            seq_first = full.permute(1, 0, 2, 3)
            for piece, index, runs in zip(split_rows(recv, self.rows), self.index, self.runs):
                piece = piece.reshape(piece.shape[0], b, hc, d)
                if runs is None:
                    seq_first.index_copy_(0, index.to(recv.device), piece)
                    continue
                for src, dst, length in runs:
                    seq_first[dst:dst + length].copy_(piece[src:src + length])
            out, start = [], 0
            for h, _ in shapes:
                out.append(full[:, :, start:start + h])
                start += h
            return out
        out = []
        for h, d in shapes:
            out.append(torch.empty((b, self.n_group, h, d), dtype=recv.dtype, device=recv.device))
        for piece, index in zip(split_rows(recv, self.rows), self.index):
            index = index.to(recv.device)
            start = 0
            for full, (h, d) in zip(out, shapes):
                part = piece[:, :, start:start + h * d].reshape(piece.shape[0], b, h, d)
                full.permute(1, 0, 2, 3).index_copy_(0, index, part)
                start += h * d
        return out

    def to_sequence(self, tensors: List[Tuple[torch.Tensor, str, int]], op: str) -> List[torch.Tensor]:
        """Head shards -> sequence shards: `(full [B, n_group, h, D], kind, total heads)`;
        replicated KV heads sum what their members computed (in fp32). The list is emptied
        as the tensors are copied into the message: a caller that holds no other reference
        frees each one then (the backward's dQ, dK, dV: the group's tokens, fp32)."""
        b = tensors[0][0].shape[0]
        device = tensors[0][0].device
        dtype = tensors[0][0].dtype
        meta = [(t.shape[2], t.shape[3], t.dtype, kind, total) for t, kind, total in tensors]
        rows = sum(self.rows)
        # each token's heads x head dim flattened, the tensors side by side (head dims may differ)
        send = torch.empty(rows, b, sum(h * d for h, d, *_ in meta), dtype=dtype, device=device)
        runs = None if any(r is None for r in self.runs) else [
            (first + src, dst, length) for first, member_runs in zip(_offsets(self.rows), self.runs)
            for src, dst, length in member_runs]
        start = 0
        while tensors:
            t = tensors.pop(0)[0]
            width = t.shape[2] * t.shape[3]
            seq_first = t.permute(1, 0, 2, 3)
            target = send[:, :, start:start + width].view(rows, b, t.shape[2], t.shape[3])
            if runs is None:
                target.copy_(seq_first.index_select(0, torch.cat(self.index).to(device)))
            else:
                for row, stored, length in runs:  # send rows from `row` on hold storage rows from `stored` on
                    target[row:row + length].copy_(seq_first[stored:stored + length])
            start += width
            del t, seq_first, target  # a view keeps its base alive
        recv = all_to_all_rows(send, self.rows, [self.rows[self.me]] * self.size, self.group, op, self.members)
        recv = recv.reshape(self.size, self.rows[self.me], b, send.shape[2])
        del send
        out, start = [], 0
        for h, d, t_dtype, kind, total in meta:
            piece = recv[:, :, :, start:start + h * d].reshape(self.size, self.rows[self.me], b, h, d)
            piece = piece.permute(2, 1, 0, 3, 4)  # [B, n, U, h, D]
            start += h * d
            if kind == "q" or self.kv_split:
                out.append(piece.reshape(b, self.rows[self.me], total, d))
            else:
                acc = torch.zeros(b, self.rows[self.me], total, d,
                                  dtype=torch.float32 if t_dtype != torch.float64 else t_dtype, device=device)
                acc.index_add_(2, self.kv_head_of.to(device), piece[:, :, :, 0].to(acc.dtype))
                out.append(acc.to(t_dtype))
        return out


class HeadParallelAttention(torch.autograd.Function):
    """Ulysses inside a group, ring across groups (a ring of one group is plain Ulysses)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, scatter: HeadScatter, ring_layout, causal, scale, backend, name):
        qf, kf, vf = scatter.to_heads([(q, "q"), (k, "kv"), (v, "kv")], op=f"{name}.forward.qkv")
        # this member's query heads are the chunk [me * hq, (me + 1) * hq)
        local_sinks = None if sinks is None else sinks[scatter.me * scatter.hq:(scatter.me + 1) * scatter.hq]
        out, lse = fold_sinks(*ring._ring_forward(qf, kf, vf, ring_layout, causal, scale, backend,
                                                  ring_op=f"{name}.forward.kv"), local_sinks)
        # with sinks the backward's rowsum(dO * O) cancels against dO . v: keep O unrounded
        saved = out if sinks is not None else out.to(q.dtype)
        (result,) = scatter.to_sequence([(saved if sinks is None else out.to(q.dtype), "q", q.shape[2])],
                                        op=f"{name}.forward.out")
        ctx.save_for_backward(qf, kf, vf, saved, lse, sinks)
        ctx.args = (scatter, ring_layout, causal, scale, backend, name, q.shape[2], k.shape[2])
        return result

    @staticmethod
    def backward(ctx, do):
        qf, kf, vf, out, lse, sinks = ctx.saved_tensors
        scatter, ring_layout, causal, scale, backend, name, heads, kv_heads = ctx.args
        (dof,) = scatter.to_heads([(do, "q")], op=f"{name}.backward.do")
        dq, dk, dv = ring._ring_backward(dof, qf, kf, vf, out, lse, ring_layout, causal, scale, backend,
                                         ring_op=f"{name}.backward.kv")
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            # this member computed every row of its heads: their whole gradient, zero elsewhere
            chunk = slice(scatter.me * scatter.hq, (scatter.me + 1) * scatter.hq)
            dsinks = torch.zeros_like(sinks)
            dsinks[chunk] = sinks_grad(dof, out, lse, sinks[chunk])
        dtype = qf.dtype
        del dof  # head-sharded dO is done with before the gradients' all-to-all
        pending = [(dq.to(dtype), "q", heads), (dk.to(dtype), "kv", kv_heads), (dv.to(dtype), "kv", kv_heads)]
        del dq, dk, dv  # to_sequence frees each as it is packed
        grads = scatter.to_sequence(pending, op=f"{name}.backward.grads")
        return (*grads, dsinks, None, None, None, None, None, None)


def analytic_bytes(layout: SeqLayout, batch: int, heads: int, kv_heads: int, head_dim: int,
                   element_size: int, members: Sequence[int] = None, value_dim: Optional[int] = None,
                   **options) -> Dict[str, int]:
    """Bytes this rank sends in the Ulysses all-to-alls (forward, backward), exactly
    (`value_dim`: v's, the output's and dO's head dim, None for head_dim)."""
    members = list(range(layout.world_size)) if members is None else list(members)
    me = members.index(layout.rank)
    size = len(members)
    hq, hkv = heads // size, kv_heads_per_member(heads, kv_heads, size)
    mine = layout.local_len_of(members[me])
    others = sum(layout.local_len_of(m) for j, m in enumerate(members) if j != me)
    d, dv = head_dim, head_dim if value_dim is None else value_dim
    unit = batch * element_size
    qkv = hq * d + hkv * (d + dv)  # elements per token of q, k and v for one member
    qkv_in = (size - 1) * mine * qkv * unit
    out_back = others * hq * dv * unit
    do_in = (size - 1) * mine * hq * dv * unit
    grads_back = others * qkv * unit
    return {"forward": qkv_in + out_back, "backward": do_in + grads_back}



# -- for the planner (seqpar.planner): schedule, memory, candidates ----------------------------


def head_parallel_cost(prob, topo, size: int, total: Dict[str, int]):
    """(timeline, `total`) of Ulysses inside groups of `size` consecutive ranks and ring
    across the groups (USP; size = P: Ulysses). `total`: the busiest rank's bytes of the
    whole strategy; the ring's share is what its all-to-alls leave. The all-to-alls are
    exposed: q/k/v in and the output back (forward); dO in and dQ/dK/dV back."""
    from ..planner.schedule import Timeline
    from ..planner.topology import steps

    world = prob.world_size
    groups = ulysses_groups(world, size)
    a2a = {"forward": 0, "backward": 0}
    for r in prob.ranks():
        got = analytic_bytes(prob.layout(r), prob.batch, prob.heads, prob.kv_heads, prob.head_dim,
                             prob.element_size, members=groups[r // size])
        for key in a2a:
            a2a[key] = max(a2a[key], got[key])
    around = {key: max(0, total[key] - a2a[key]) for key in a2a}  # the ring across groups
    a2a_level = "intra" if all(topo.level(g) == "intra" for g in groups) else "inter"
    # ring m joins member m of every group; it is intra-node only if each such ring is
    ring_level = "intra" if all(topo.level([g[m] for g in groups]) == "intra" for m in range(size)) else "inter"
    ring_layout = GroupLayout(prob.layout(), groups, 0)
    heads = prob.heads // size
    line = Timeline(topo.overlap)
    line.wait(topo.transfer(a2a_level, "alltoall", size, a2a["forward"], calls=2), 2 * steps("alltoall", size))
    ring.ring_phase(line, prob, topo, ring_layout, heads, around["forward"], 0.0, ring_level, backward=False)
    if prob.training:
        line.wait(topo.transfer(a2a_level, "alltoall", size, a2a["backward"], calls=2), 2 * steps("alltoall", size))
        ring.ring_phase(line, prob, topo, ring_layout, heads, around["forward"], around["backward"] - around["forward"],
                        ring_level, backward=True)
    return line, total


def head_parallel_memory(prob, size: int) -> int:
    """Peak bytes of Ulysses in groups of `size` (USP; size = P: Ulysses).

    Saved: the group's tokens of this member's heads (q, k, v) and its output, and the lse.
    The backward's fullest moment is either its compute (dO, the head-sharded dO, the fp32
    dQ/dK/dV of the member's heads, the outer ring's held and arriving K/V and travelling
    dK/dV, one backward tile) or the gradients' all-to-all (dO, the message out and the
    message in, which is then unpacked while the message out is already freed)."""
    from .common import backward_tile_bytes

    b, h, hkv, d, n = prob.batch, prob.heads, prob.kv_heads, prob.head_dim, prob.longest_local
    e, a = prob.element_size, prob.acc_size
    hq, hk = h // size, kv_heads_per_member(h, hkv, size)
    ng = n * size  # the group's tokens
    full = b * ng * (hq + 2 * hk) * d
    heads_out = b * ng * hq * d  # this member's query heads over the group's tokens
    rows = b * n * h * d
    ring = prob.world_size // size
    ring_kv = 2 * b * ng * hk * d if ring > 1 else 0
    saved = full * e + heads_out * e + b * hq * ng * a
    fwd = 2 * full * e + 3 * ring_kv * e + (heads_out * a if a != e else 0) + b * hq * ng * 8
    travelling = (2 if ring >= 3 else 1) * ring_kv * a
    compute = rows * e + heads_out * e + full * a + 2 * ring_kv * e + travelling + backward_tile_bytes(
        b, ng, hq, hk, d, a, element_size=e)
    exchange = rows * e + 2 * full * e
    return prob.peak(saved, fwd, max(compute, exchange))


def cost(prob, topo, options):
    from ..planner.schedule import busiest_bytes

    return head_parallel_cost(prob, topo, prob.world_size, busiest_bytes(prob, analytic_bytes, options))


def peak_memory(prob, options) -> int:
    return head_parallel_memory(prob, prob.world_size)


def candidates(prob):
    return [{}]

def _check(q, k, v, layout, options):
    reason = head_constraint(q.shape[2], k.shape[2], layout.world_size, "ulysses")
    if reason:
        raise ValueError(reason)


def _apply(q, k, v, layout, causal, scale, backend, options, sinks=None):
    world = layout.world_size
    ring_layout = GroupLayout(layout, [list(range(world))], 0)
    scatter = HeadScatter(layout, list(range(world)), layout.rank, layout.group, ring_layout,
                          q.shape[2], k.shape[2])
    return HeadParallelAttention.apply(q, k, v, sinks, scatter, ring_layout, causal, scale, backend, "ulysses")


def ulysses_attention(q, k, v, *, layout=None, causal=False, softmax_scale=None, backend="auto", **options):
    """Exact attention by Ulysses: all-to-all to head shards, attention, all-to-all back.

    `q` `[B, S/P, H, D]`, `k`/`v` `[B, S/P, H_kv, D]` of `layout` (any scheme, uneven
    lengths). Needs `H % P == 0` and `H_kv % P == 0` or `P % H_kv == 0` (KV heads are then
    sent only to the ranks that need them); otherwise a ValueError names USP and ring.
    Returns `[B, S/P, H, D]` in the input dtype; differentiable in q, k, v.
    """
    return run("ulysses", q, k, v, layout=layout, causal=causal, softmax_scale=softmax_scale,
                        backend=backend, **options)


register(Strategy("ulysses", _apply, analytic_bytes, check=_check, cost=cost, peak_memory=peak_memory,
                  candidates=candidates))
