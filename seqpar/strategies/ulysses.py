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
With `head_chunks` c each member's heads take these steps in c chunks, pipelined: a
chunk's exchange flies while its neighbour chunk computes (`HeadParallelAttention`).

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

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..comm.alltoall import post_all_to_all_rows, split_rows
from ..errors import brief
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


def default_head_chunks(heads: int, kv_heads: int, size: int) -> int:
    """Two head chunks when each of the `size` members' KV heads split evenly in two (the
    pipeline then leaves half of each pass's all-to-all bytes exposed), else one."""
    if size < 2 or kv_heads % size:
        return 1
    return 2 if (kv_heads // size) % 2 == 0 else 1


def head_chunks_reason(chunks: int, heads: int, kv_heads: int, size: int) -> Optional[str]:
    """Why `chunks` head chunks cannot split the heads of `size` members, or None: a chunk
    holds whole KV heads of every member, so `chunks` divides the KV heads per member (one
    when KV heads are replicated). `head_constraint` must have passed."""
    per = kv_heads_per_member(heads, kv_heads, size)
    if per % chunks:
        members = f"{size} member{'s' if size != 1 else ''}"
        return (f"head_chunks: expected a divisor of the KV heads per Ulysses member ({kv_heads} KV heads over "
                f"{members}: {per}{', replicated' if kv_heads % size else ''}), got {chunks}")
    return None


def check_head_chunks_type(chunks) -> None:
    if chunks is None:
        return
    if isinstance(chunks, bool) or not isinstance(chunks, int):
        raise TypeError(f"head_chunks: expected a positive int or None, got {brief(chunks)}")
    if chunks < 1:
        raise ValueError(f"head_chunks: expected a positive int or None, got {chunks}")


@dataclass(frozen=True)
class Options:
    """`head_chunks` c: each member's heads go through the all-to-alls and the attention in
    c pipelined chunks (`HeadParallelAttention`); None means `default_head_chunks`."""
    head_chunks: Optional[int] = None

    def __post_init__(self):
        check_head_chunks_type(self.head_chunks)

    def resolve(self, q, k, v, layout) -> "Options":
        if self.head_chunks is not None:
            return self
        return Options(default_head_chunks(q.shape[2], k.shape[2], layout.world_size))


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

    def _per_member(self, x: torch.Tensor, kind: str, chunk: Tuple[int, int]) -> torch.Tensor:
        """[B, n, H_x, D] -> [U, n, B, h, D]: head chunk `j` of `c` (`chunk`) of each member's heads."""
        b, n, h, d = x.shape
        j, c = chunk
        if kind == "q" or self.kv_split:
            heads = x.reshape(b, n, self.size, c, h // (self.size * c), d)[:, :, :, j]
        else:
            heads = x.index_select(2, self.kv_head_of.to(x.device)).unsqueeze(3)
        return heads.permute(2, 1, 0, 3, 4)

    def post_to_heads(self, tensors: Sequence[Tuple[torch.Tensor, str]], op: str,
                      chunk: Tuple[int, int] = (0, 1)) -> "_Landing":
        """Sequence shards -> head shards over the group's tokens, posted; the returned
        exchange's `wait()` gives the tensors `[B, n_group, h, D]`, contiguous views of one
        buffer. `chunk` `(j, c)`: only the j-th of c equal chunks of each member's heads.
        The tensors travel in one all-to-all, each token's heads x head dim flattened, so
        that they may differ in head dim (v's own, in MLA). This member's own share does
        not travel: `wait()` copies it straight from `tensors` (which the caller keeps:
        the inputs, or dO), once, instead of into the message, through the backend's local
        copy and out of it again."""
        b = tensors[0][0].shape[0]
        c = chunk[1]
        shapes = [((self.hq if kind == "q" else self.hkv) // c, t.shape[3]) for t, kind in tensors]
        rows_me, me = self.rows[self.me], self.me
        # one copy of each tensor, straight into its columns of the message: the other
        # members' heads, in member order, this member's slot left out
        send = tensors[0][0].new_empty((self.size - 1, rows_me, b, sum(h * d for h, d in shapes)))
        start = 0
        for (t, kind), (h, d) in zip(tensors, shapes):
            target = send[..., start:start + h * d].view(self.size - 1, rows_me, b, h, d)
            heads = self._per_member(t, kind, chunk)
            target[:me].copy_(heads[:me])
            target[me:].copy_(heads[me + 1:])
            start += h * d
        send = send.view((self.size - 1) * rows_me, b, send.shape[3])
        send_rows = [0 if m == me else rows_me for m in range(self.size)]
        recv_rows = [0 if m == me else n for m, n in enumerate(self.rows)]
        exchange = post_all_to_all_rows(send, send_rows, recv_rows, self.group, op, self.members)
        return _Landing(exchange, lambda recv: self._unpack_heads(recv, b, shapes, tensors, chunk))

    def _own_share(self, t: torch.Tensor, kind: str, chunk: Tuple[int, int], into: torch.Tensor) -> None:
        """This member's heads of `t` (its own rows, `[B, n_me, H_x, D]`) into its rows of
        `into` (`[n_group, B, h, D]`, sequence first)."""
        own = self._per_member(t, kind, chunk)[self.me]  # [n_me, B, h, D]
        runs = self.runs[self.me]
        if runs is None:
            into.index_copy_(0, self.index[self.me].to(into.device), own)
            return
        for src, dst, length in runs:
            into[dst:dst + length].copy_(own[src:src + length])

    def _unpack_heads(self, recv: torch.Tensor, b: int, shapes, tensors, chunk) -> List[torch.Tensor]:
        others = [m for m in range(self.size) if m != self.me]
        pieces = split_rows(recv, [self.rows[m] for m in others])
        if len(shapes) == 1 or len(set(d for _, d in shapes)) == 1:
            # one head dim: one buffer, one copy per member, the tensors' heads side by side
            d = shapes[0][1]
            hc = sum(h for h, _ in shapes)
            full = torch.empty((b, self.n_group, hc, d), dtype=recv.dtype, device=recv.device)
            seq_first = full.permute(1, 0, 2, 3)
            start = 0
            for (t, kind), (h, _) in zip(tensors, shapes):
                self._own_share(t, kind, chunk, seq_first[:, :, start:start + h])
                start += h
            for m, piece in zip(others, pieces):
                piece = piece.reshape(piece.shape[0], b, hc, d)
                index, runs = self.index[m], self.runs[m]
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
        for (t, kind), (h, d) in zip(tensors, shapes):
            full = torch.empty((b, self.n_group, h, d), dtype=recv.dtype, device=recv.device)
            self._own_share(t, kind, chunk, full.permute(1, 0, 2, 3))
            out.append(full)
        for m, piece in zip(others, pieces):
            index = self.index[m].to(recv.device)
            start = 0
            for full, (h, d) in zip(out, shapes):
                part = piece[:, :, start:start + h * d].reshape(piece.shape[0], b, h, d)
                full.permute(1, 0, 2, 3).index_copy_(0, index, part)
                start += h * d
        return out

    def post_to_sequence(self, tensors: List[Tuple[torch.Tensor, str]], into: "_Lazy", op: str,
                         chunk: Tuple[int, int] = (0, 1)) -> "_Landing":
        """Head shards -> sequence shards, posted: `(part [B, n_group, h, D], kind)` land,
        when the returned exchange's `wait()` runs, in head chunk `chunk` `(j, c)` of the
        tensors `into()` gives (`[B, n_me, H_x, D]`, contiguous, one per part; made when
        the first part lands, so a single chunk's message out is freed by then);
        replicated KV heads sum what their members computed (in fp32). The list is emptied
        as the parts are copied into the message: a caller that holds no other reference
        frees each one then (the backward's dQ, dK, dV: the group's tokens, fp32)."""
        b = tensors[0][0].shape[0]
        device = tensors[0][0].device
        dtype = tensors[0][0].dtype
        meta = [(t.shape[2], t.shape[3], kind) for t, kind in tensors]
        rows = sum(self.rows)
        # each token's heads x head dim flattened, the tensors side by side (head dims may differ)
        send = torch.empty(rows, b, sum(h * d for h, d, _ in meta), dtype=dtype, device=device)
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
        exchange = post_all_to_all_rows(send, self.rows, [self.rows[self.me]] * self.size, self.group, op,
                                        self.members)
        del send
        return _Landing(exchange, lambda recv: self._unpack_sequence(recv, b, meta, into, chunk))

    def _unpack_sequence(self, recv: torch.Tensor, b: int, meta, into, chunk: Tuple[int, int]) -> None:
        n_me = self.rows[self.me]
        j, c = chunk
        recv = recv.reshape(self.size, n_me, b, recv.shape[2])
        start = 0
        for (h, d, kind), dest in zip(meta, into()):
            piece = recv[:, :, :, start:start + h * d].reshape(self.size, n_me, b, h, d)
            piece = piece.permute(2, 1, 0, 3, 4)  # [B, n, U, h, D]
            start += h * d
            if kind == "q" or self.kv_split:
                dest.view(b, n_me, self.size, c, h, d)[:, :, :, j].copy_(piece)
            else:
                acc = torch.zeros(dest.shape, dtype=torch.float32 if dest.dtype != torch.float64 else dest.dtype,
                                  device=dest.device)
                acc.index_add_(2, self.kv_head_of.to(dest.device), piece[:, :, :, 0].to(acc.dtype))
                dest.copy_(acc)


class _Lazy:
    """A list of tensors made on the first call (`factory()`), the same list after."""

    def __init__(self, factory):
        self._factory, self._made = factory, None

    def __call__(self) -> List[torch.Tensor]:
        if self._made is None:
            self._made, self._factory = self._factory(), None
        return self._made


class _Landing:
    """An all-to-all of `HeadScatter` in flight; `wait()`, called once, unpacks what arrived
    and returns it, keeping no reference (the caller frees it when done)."""

    def __init__(self, exchange, unpack):
        self._exchange, self._unpack = exchange, unpack

    def wait(self):
        exchange, unpack = self._exchange, self._unpack
        self._exchange = self._unpack = None
        return unpack(exchange.wait())


class HeadParallelAttention(torch.autograd.Function):
    """Ulysses inside a group, ring across groups (a ring of one group is plain Ulysses).

    With `chunks` c > 1 each member's heads go in c chunks, pipelined: chunk j+1's q/k/v
    all-to-all flies while chunk j computes, and chunk j's output returns while chunk j+1
    computes; likewise dO and dQ/dK/dV in the backward. Only the first inbound and the last
    outbound exchange of a pass wait exposed, 1/c of the bytes each. Every member posts the
    exchanges in the same order, so they pair up on any backend."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, scatter: HeadScatter, ring_layout, causal, scale, backend, name, chunks):
        hc = scatter.hq // chunks  # query heads of a member's chunk
        result = _Lazy(lambda: [q.new_empty(q.shape[:3] + (v.shape[3],))])
        inputs = [(q, "q"), (k, "kv"), (v, "kv")]
        arriving = scatter.post_to_heads(inputs, op=f"{name}.forward.qkv", chunk=(0, chunks))
        leaving, saved_parts = None, []
        for j in range(chunks):
            qf, kf, vf = arriving.wait()
            if j + 1 < chunks:
                arriving = scatter.post_to_heads(inputs, op=f"{name}.forward.qkv", chunk=(j + 1, chunks))
            first = scatter.me * scatter.hq + j * hc  # this member's query heads in the chunk
            local_sinks = None if sinks is None else sinks[first:first + hc]
            out, lse = fold_sinks(*ring._ring_forward(qf, kf, vf, ring_layout, causal, scale, backend,
                                                      ring_op=f"{name}.forward.kv"), local_sinks)
            sent = out.to(q.dtype)
            # with sinks the backward's rowsum(dO * O) cancels against dO . v: keep O unrounded
            kept = out if sinks is not None else sent
            if leaving is not None:
                leaving.wait()
            leaving = scatter.post_to_sequence([(sent, "q")], result, op=f"{name}.forward.out", chunk=(j, chunks))
            saved_parts += [qf, kf, vf, kept, lse]
            del qf, kf, vf, out, sent, kept, lse
        leaving.wait()
        ctx.save_for_backward(sinks, *saved_parts)
        ctx.args = (scatter, ring_layout, causal, scale, backend, name, chunks, k.shape, v.shape)
        return result()[0]

    @staticmethod
    def backward(ctx, do):
        sinks, *saved_parts = ctx.saved_tensors
        scatter, ring_layout, causal, scale, backend, name, chunks, k_shape, v_shape = ctx.args
        hc = scatter.hq // chunks
        dtype = saved_parts[0].dtype
        grads = _Lazy(lambda: [do.new_empty(do.shape[:3] + (saved_parts[0].shape[3],), dtype=dtype),
                               do.new_empty(k_shape, dtype=dtype), do.new_empty(v_shape, dtype=dtype)])
        want_dsinks = sinks is not None and ctx.needs_input_grad[3]
        dsinks = torch.zeros_like(sinks) if want_dsinks else None
        arriving = scatter.post_to_heads([(do, "q")], op=f"{name}.backward.do", chunk=(0, chunks))
        leaving = None
        for j in range(chunks):
            qf, kf, vf, out, lse = saved_parts[5 * j:5 * j + 5]
            (dof,) = arriving.wait()
            if j + 1 < chunks:
                arriving = scatter.post_to_heads([(do, "q")], op=f"{name}.backward.do", chunk=(j + 1, chunks))
            dq_j, dk_j, dv_j = ring._ring_backward(dof, qf, kf, vf, out, lse, ring_layout, causal, scale, backend,
                                                   ring_op=f"{name}.backward.kv")
            if want_dsinks:
                # this member computed every row of its heads: their whole gradient, zero elsewhere
                first = scatter.me * scatter.hq + j * hc
                dsinks[first:first + hc] = sinks_grad(dof, out, lse, sinks[first:first + hc])
            del dof  # head-sharded dO is done with before the gradients' all-to-all
            pending = [(dq_j.to(dtype), "q"), (dk_j.to(dtype), "kv"), (dv_j.to(dtype), "kv")]
            del dq_j, dk_j, dv_j  # post_to_sequence frees each as it is packed
            if leaving is not None:
                leaving.wait()
            leaving = scatter.post_to_sequence(pending, grads, op=f"{name}.backward.grads", chunk=(j, chunks))
        leaving.wait()
        return (*grads(), dsinks, None, None, None, None, None, None, None)


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


def head_parallel_cost(prob, topo, size: int, total: Dict[str, int], chunks: int = 1):
    """(timeline, `total`) of Ulysses inside groups of `size` consecutive ranks and ring
    across the groups (USP; size = P: Ulysses). `total`: the busiest rank's bytes of the
    whole strategy; the ring's share is what its all-to-alls leave. Each pass's all-to-alls
    (q/k/v in and the output back; dO in and dQ/dK/dV back) go in `chunks` head chunks:
    the first chunk's inbound and the last one's outbound exchange are exposed, the others
    fly while a chunk computes (`HeadParallelAttention`); one chunk leaves all exposed."""
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
    # q/k/v (or dQ/dK/dV) against the output (or dO): elements per token of a member's heads
    qkv = heads * prob.head_dim + 2 * kv_heads_per_member(prob.heads, prob.kv_heads, size) * prob.head_dim
    share = qkv / (qkv + heads * prob.head_dim)
    calls = steps("alltoall", size)

    def one_pass(line, inbound: float, outbound: float, kv: float, grads: float, backward: bool) -> None:
        part = Timeline(topo.overlap)  # one chunk's attention (and, in USP, its ring)
        ring.ring_phase(part, prob, topo, ring_layout, heads // chunks, kv / chunks, grads / chunks, ring_level,
                        backward=backward)
        arrive = topo.transfer(a2a_level, "alltoall", size, inbound / chunks)
        leave = topo.transfer(a2a_level, "alltoall", size, outbound / chunks)
        line.wait(arrive, calls)
        for j in range(chunks):
            flying = (arrive if j + 1 < chunks else 0.0) + (leave if j else 0.0)
            line.overlap(part.total, flying, part.messages + calls * ((j + 1 < chunks) + (j > 0)))
        line.wait(leave, calls)

    line = Timeline(topo.overlap)
    one_pass(line, a2a["forward"] * share, a2a["forward"] * (1 - share), around["forward"], 0.0, False)
    if prob.training:
        one_pass(line, a2a["backward"] * (1 - share), a2a["backward"] * share, around["forward"],
                 around["backward"] - around["forward"], True)
    return line, total


def head_parallel_memory(prob, size: int, chunks: int = 1) -> int:
    """Peak bytes of Ulysses in groups of `size` (USP; size = P: Ulysses), its heads in
    `chunks` pipelined chunks.

    Saved: the group's tokens of this member's heads (q, k, v) and its output, and the lse.
    Forward: one chunk's q/k/v message out and in, the next chunk's; with three chunks or
    more the previous chunk's output messages too; the chunk's accumulators and the outer
    ring's K/V. The backward's fullest moment is either a chunk's compute (dO, the chunk's
    head-sharded dO and fp32 dQ/dK/dV, the outer ring's held and arriving K/V and
    travelling dK/dV, one backward tile; with two chunks or more the previous chunk's
    gradient messages out and in, from three the gradients in the caller's layout, made
    when the first chunk's land, and the next chunk's dO messages) or the last gradients'
    all-to-all (dO, the message out and in and, with several chunks, the gradients in the
    caller's layout; one chunk's message in is unpacked into them after the message out is
    freed)."""
    from .common import backward_tile_bytes

    b, h, hkv, d, n = prob.batch, prob.heads, prob.kv_heads, prob.head_dim, prob.longest_local
    e, a, c = prob.element_size, prob.acc_size, chunks
    hq, hk = h // size, kv_heads_per_member(h, hkv, size)
    ng = n * size  # the group's tokens
    full = b * ng * (hq + 2 * hk) * d
    heads_out = b * ng * hq * d  # this member's query heads over the group's tokens
    rows = b * n * h * d
    grads = b * n * (h + 2 * hkv) * d  # dQ, dK, dV of this rank's tokens
    ring = prob.world_size // size
    ring_kv = 2 * b * ng * hk * d if ring > 1 else 0
    saved = full * e + heads_out * e + b * hq * ng * a
    fwd = (2 * full * e + (2 * heads_out * e if c >= 3 else 0) + 3 * ring_kv * e
           + (heads_out * a if a != e else 0) + b * hq * ng * 8) // c
    travelling = (2 if ring >= 3 else 1) * ring_kv * a
    compute = rows * e + (heads_out * e + full * a + 2 * ring_kv * e + travelling) // c + backward_tile_bytes(
        b, ng, hq // c, max(1, hk // c), d, a, element_size=e)
    if c >= 2:  # the previous chunk's gradients in flight; from three chunks the gradients
        # in the caller's layout (made when the first chunk's land) and the next dO too
        compute += 2 * full * e // c + (grads * e + 2 * heads_out * e // c if c >= 3 else 0)
    exchange = rows * e + (2 * full * e if c == 1 else grads * e + 2 * full * e // c)
    return prob.peak(saved, fwd, max(compute, exchange))


def planned_head_chunks(prob, size: int, options) -> int:
    """The head chunks of a planned call: the option given, else the default for `size`."""
    return options.get("head_chunks") or default_head_chunks(prob.heads, prob.kv_heads, size)


def cost(prob, topo, options):
    from ..planner.schedule import busiest_bytes

    size = prob.world_size
    nbytes = busiest_bytes(prob, analytic_bytes, options)
    return head_parallel_cost(prob, topo, size, nbytes, planned_head_chunks(prob, size, options))


def peak_memory(prob, options) -> int:
    return head_parallel_memory(prob, prob.world_size, planned_head_chunks(prob, prob.world_size, options))


def candidates(prob):
    """The default head chunks, and one chunk where the default pipelines (fewer messages:
    it wins where latency, not bytes, costs)."""
    return [{}] + ([{"head_chunks": 1}] if default_head_chunks(prob.heads, prob.kv_heads, prob.world_size) > 1 else [])

def _check(q, k, v, layout, options: Options):
    reason = head_constraint(q.shape[2], k.shape[2], layout.world_size, "ulysses") or head_chunks_reason(
        options.head_chunks, q.shape[2], k.shape[2], layout.world_size)
    if reason:
        raise ValueError(reason)


def _apply(q, k, v, layout, causal, scale, backend, options: Options, sinks=None):
    world = layout.world_size
    ring_layout = GroupLayout(layout, [list(range(world))], 0)
    scatter = HeadScatter(layout, list(range(world)), layout.rank, layout.group, ring_layout,
                          q.shape[2], k.shape[2])
    return HeadParallelAttention.apply(q, k, v, sinks, scatter, ring_layout, causal, scale, backend, "ulysses",
                                       options.head_chunks)


def ulysses_attention(q, k, v, *, layout=None, causal=False, softmax_scale=None, backend="auto",
                      head_chunks: Optional[int] = None, **options):
    """Exact attention by Ulysses: all-to-all to head shards, attention, all-to-all back.

    `q` `[B, S/P, H, D]`, `k`/`v` `[B, S/P, H_kv, D]` of `layout` (any scheme, uneven
    lengths). Needs `H % P == 0` and `H_kv % P == 0` or `P % H_kv == 0` (KV heads are then
    sent only to the ranks that need them); otherwise a ValueError names USP and ring.
    `head_chunks` c: each rank's heads in c pipelined chunks, each chunk's all-to-all flying
    while the previous one computes (c must divide the KV heads per rank; default: 2 where
    they split evenly, else 1). Returns `[B, S/P, H, D]` in the input dtype; differentiable
    in q, k, v.
    """
    return run("ulysses", q, k, v, layout=layout, causal=causal, softmax_scale=softmax_scale,
                        backend=backend, head_chunks=head_chunks, **options)


register(Strategy("ulysses", _apply, analytic_bytes, Options, check=_check, cost=cost, peak_memory=peak_memory,
                  candidates=candidates))
