"""Which global token positions each rank holds, and which query-key pairs are visible.

A layout is a list of *runs* per rank: arithmetic progressions of global positions
(`start, start + stride, ...`) stored one after the other in the local tensor. Contiguous
has one run of stride 1, zigzag two runs of stride 1, stripe one run of stride P. Every
mask in seqpar is derived from these positions (`visible_blocks`), never from assumptions
about which rank comes "before" which; that is what lets every strategy serve every scheme.

Documents (`cu_seqlens`, packed sequences): a token sees only tokens of its own document.
`visible_blocks` cuts runs at document boundaries and pairs only pieces of the same
document, so a block never spans two documents and pairs of different documents are
never computed. Zigzag cuts every document into 2P chunks; "balanced" keeps short
documents whole on one rank and cuts only the long ones (`_balanced_runs`).
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

SCHEMES = ("contiguous", "zigzag", "stripe", "balanced")
# "balanced" cuts a document into 2P zigzag chunks when its causal work exceeds this share
# of the mean work per rank; the greedy packing of the rest then leaves the busiest rank
# within this share of the mean (see _balanced_runs)
BALANCE_SLACK = 0.05


@dataclass(frozen=True)
class Run:
    """`length` global positions `start + stride * i`, at local offset `local_start`."""

    start: int
    length: int
    stride: int
    local_start: int


@dataclass(frozen=True)
class Block:
    """A query slice against a key slice (local offsets) and its mask: key j is visible to
    query i iff `lo <= j - i <= offset` (indices relative to the slices); None leaves that
    side unbounded (`offset=None, lo=None`: every key visible). `offset` alone is a causal
    offset; `lo` comes from a sliding window's left edge."""

    q_start: int
    q_len: int
    k_start: int
    k_len: int
    offset: Optional[int]
    lo: Optional[int] = None
    softcap: float = 0.0  # the call's logit softcap (0: none), carried to the kernel with the block


@dataclass(frozen=True)
class Mask:
    """What a query at global position i sees, besides its own document: keys j <= i when
    `causal`, and `i - left <= j <= i + right` for `window = (left, right)` (flash-attn's
    `window_size`; -1: unbounded on that side). Strategies pass it where a bare `causal`
    bool used to go; `visible_blocks` takes either."""

    causal: bool = False
    window: Tuple[int, int] = (-1, -1)
    softcap: float = 0.0  # not a mask, but every block of the call carries it to the kernel

    @property
    def windowed(self) -> bool:
        return self.window != (-1, -1)


def as_mask(causal) -> Mask:
    return causal if isinstance(causal, Mask) else Mask(bool(causal))


def split_sizes(n: int, parts: int) -> List[int]:
    """Sizes of `torch.tensor_split(range(n), parts)`: the first `n % parts` get one more."""
    base, extra = divmod(n, parts)
    return [base + 1 if i < extra else base for i in range(parts)]


def as_process_group(group):
    """`group` as a ProcessGroup: a 1-D `torch.distributed.DeviceMesh` (or a named axis of
    one, `mesh["cp"]`) becomes its process group; None and ProcessGroups pass unchanged."""
    if group is None:
        return None
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # a torch without DeviceMesh
        return group
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            names = getattr(group, "mesh_dim_names", None)
            pick = f' (e.g. mesh["{names[0]}"])' if names else ""
            raise ValueError(f"group: expected a ProcessGroup or a 1-D DeviceMesh{pick}, got a {group.ndim}-D "
                             f"DeviceMesh of shape {tuple(group.shape)} with dim names {names}")
        return group.get_group()
    return group


def group_rank_and_size(group) -> tuple:
    """(rank, world size) of `group` (a ProcessGroup, a 1-D DeviceMesh or None); a process
    without torch.distributed is a world of one."""
    group = as_process_group(group)
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: a process group was given but torch.distributed is not initialized")
    return dist.get_rank(group), dist.get_world_size(group)


class SeqLayout:
    """Which global positions of a `seq_len`-token sequence each rank of `group` holds.

    `scheme`: "contiguous" (rank r holds the r-th of P runs), "zigzag" (2P chunks; rank r
    holds chunks r and 2P-1-r; with documents, of every document), "stripe" (token i on
    rank i mod P) or "balanced" (whole short documents on one rank, long ones cut zigzag;
    without documents, zigzag). Any `seq_len >= world_size` is valid; unequal chunks differ
    by at most one token, as `torch.tensor_split` makes them. `cu_seqlens`: packed
    documents' boundaries `[0, l1, ..., seq_len]` (a token sees only its own document);
    with documents a rank may hold no token.
    """

    def __init__(self, seq_len: int, *, group=None, scheme: str = "contiguous", cu_seqlens=None,
                 _collective: bool = True):
        # collective: a rank whose arguments are bad, or differ from its peers', raises on
        # every rank here instead of leaving the others waiting in the next collective
        group = as_process_group(group)  # a 1-D DeviceMesh is served by its process group
        rank, world = group_rank_and_size(group)
        error = None
        bounds = None
        try:
            if isinstance(seq_len, bool) or not isinstance(seq_len, int):
                raise TypeError(f"seq_len: expected an int, got {type(seq_len).__name__}")
            if scheme not in SCHEMES:
                raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
            bounds = _check_cu_seqlens(cu_seqlens, seq_len)
            self._init(seq_len, scheme, group, world, rank, bounds)
        except (TypeError, ValueError) as exc:
            error = exc
        if _collective:
            from .comm.groups import agree, describe

            signature = (("seq_len", describe(seq_len)), ("scheme", describe(scheme)),
                         ("cu_seqlens (documents; a checksum of the boundaries)", documents_key(bounds)))
            agree(group, world, signature, error, what="SeqLayout")
        elif error is not None:
            raise error

    @classmethod
    def simulated(cls, seq_len: int, world_size: int, rank: int = 0, scheme: str = "contiguous",
                  cu_seqlens=None) -> "SeqLayout":
        """The layout rank `rank` of a `world_size`-rank group would have, without a group
        (for planning and tests; strategies refuse it unless the real group has that size)."""
        if scheme not in SCHEMES:
            raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        layout = cls.__new__(cls)
        layout._init(seq_len, scheme, None, world_size, rank, _check_cu_seqlens(cu_seqlens, seq_len))
        return layout

    def _init(self, seq_len: int, scheme: str, group, world: int, rank: int,
              documents: Optional[Tuple[int, ...]] = None) -> None:
        if seq_len < world:
            raise ValueError(
                f"seq_len: expected at least the world size ({world}), got {seq_len}"
            )
        self.seq_len = seq_len
        self.scheme = scheme
        self.group = group
        self.world_size = world
        self.rank = rank
        # document boundaries [0, l1, ..., seq_len] as python ints, or None (one document)
        self.documents = documents
        self._runs = _layout_runs(seq_len, scheme, world, documents)
        self._lens = [sum(run.length for run in runs) for runs in self._runs]

    @property
    def geometry(self) -> tuple:
        """What decides every rank's positions: equal geometries, equal layouts (a cache key)."""
        return (self.seq_len, self.scheme, self.world_size, self.documents)

    @property
    def cu_seqlens(self) -> Optional[torch.Tensor]:
        """The document boundaries `[0, l1, l1+l2, ..., seq_len]` (LongTensor), or None."""
        return None if self.documents is None else torch.tensor(self.documents, dtype=torch.long)

    def document_positions(self, device=None) -> torch.Tensor:
        """`LongTensor[local_len]`: each local token's position inside its own document
        (for RoPE on packed sequences); `positions()` when there are no documents."""
        positions = self.positions(device)
        if self.documents is None:
            return positions
        starts = torch.tensor(self.documents[:-1], dtype=torch.long, device=positions.device)
        doc = torch.searchsorted(starts, positions, right=True) - 1
        return positions - starts[doc]

    # -- queries about any rank ------------------------------------------------------------
    def peer(self, rank: int) -> int:
        """The rank of `self.group` that plays `rank` (the identity for a SeqLayout)."""
        return rank

    def runs(self, rank: Optional[int] = None) -> List[Run]:
        return self._runs[self.rank if rank is None else rank]

    def local_len_of(self, rank: int) -> int:
        return self._lens[rank]

    @property
    def local_lens(self) -> List[int]:
        return list(self._lens)

    @property
    def local_len(self) -> int:
        return self._lens[self.rank]

    def positions_of(self, rank: int, device=None) -> torch.Tensor:
        parts = [
            torch.arange(run.start, run.start + run.stride * run.length, run.stride, device=device)
            for run in self._runs[rank]
        ]
        if not parts:  # with documents a rank may hold no token (e.g. zigzag of one-token documents)
            return torch.empty(0, dtype=torch.long, device=device)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def positions(self, device=None) -> torch.Tensor:
        """`LongTensor[local_len]`: global positions of this rank's tokens, in local order."""
        return self.positions_of(self.rank, device)

    # -- moving data ---------------------------------------------------------------------
    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of the global tensor `x` (its `dim` has `seq_len` entries)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        dim = dim % x.dim() if x.dim() else dim
        if x.dim() == 0 or x.shape[dim] != self.seq_len:
            raise ValueError(
                f"x: expected dim {dim} of size seq_len={self.seq_len}, got shape {tuple(x.shape)}"
            )
        pieces = []
        for run in self.runs():
            if run.stride == 1:
                pieces.append(x.narrow(dim, run.start, run.length))
            else:
                index = [slice(None)] * x.dim()
                index[dim] = slice(run.start, None, run.stride)
                pieces.append(x[tuple(index)])
        if not pieces:  # a rank that holds no token (documents)
            return x.narrow(dim, 0, 0)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)

    def unshard(self, x_local: torch.Tensor, dim: int = 1, *, reduce_grad: bool = False) -> torch.Tensor:
        """The global tensor, rebuilt on every rank from each rank's `x_local`; differentiable.

        The backward gives each rank the gradient of its own rows. With the default
        `reduce_grad=False` that is right when every rank computes the same loss from the
        global tensor; with `reduce_grad=True` the gradients of all ranks are summed first
        (right when each rank's loss differs), as `torch.distributed.nn.all_gather` does.
        """
        if not isinstance(x_local, torch.Tensor):
            raise TypeError(f"x_local: expected a torch.Tensor, got {type(x_local).__name__}")
        dim = dim % x_local.dim()
        if x_local.shape[dim] != self.local_len:
            raise ValueError(
                f"x_local: expected dim {dim} of size local_len={self.local_len}, got shape {tuple(x_local.shape)}"
            )
        return _Unshard.apply(x_local, self, dim, reduce_grad)

    def __repr__(self) -> str:
        docs = "" if self.documents is None else f", documents={len(self.documents) - 1}"
        return (
            f"SeqLayout(seq_len={self.seq_len}, scheme={self.scheme!r}, world_size={self.world_size}, "
            f"rank={self.rank}, local_lens={self._lens}{docs})"
        )


# -- documents and schemes -----------------------------------------------------------------

def _check_cu_seqlens(cu_seqlens, seq_len: int) -> Optional[Tuple[int, ...]]:
    """`cu_seqlens` as a tuple of python ints, checked; None stays None."""
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
            raise ValueError(f"cu_seqlens: expected a 1-D integer tensor, got {cu_seqlens.dim()}-D {cu_seqlens.dtype}")
        bounds = tuple(int(x) for x in cu_seqlens.tolist())
    elif isinstance(cu_seqlens, (list, tuple)):
        if any(isinstance(x, bool) or not isinstance(x, int) for x in cu_seqlens):
            raise TypeError("cu_seqlens: expected a sequence of ints or a 1-D integer tensor, got an element of type "
                            + next(type(x).__name__ for x in cu_seqlens if isinstance(x, bool) or not isinstance(x, int)))
        bounds = tuple(cu_seqlens)
    else:
        raise TypeError(f"cu_seqlens: expected None, a sequence of ints or a 1-D integer tensor, "
                        f"got {type(cu_seqlens).__name__}")
    if len(bounds) < 2 or bounds[0] != 0:
        shown = list(bounds[:4])
        raise ValueError(f"cu_seqlens: expected boundaries starting at 0 and ending at seq_len={seq_len}, "
                         f"[0, l1, l1+l2, ..., {seq_len}], got {len(bounds)} values starting {shown}")
    if bounds[-1] != seq_len:
        raise ValueError(f"cu_seqlens: expected the last boundary to be seq_len={seq_len}, got {bounds[-1]}")
    bad = next((i for i in range(1, len(bounds)) if bounds[i] <= bounds[i - 1]), None)
    if bad is not None:
        raise ValueError(f"cu_seqlens: expected strictly increasing boundaries (documents of at least one token), "
                         f"got cu_seqlens[{bad - 1}]={bounds[bad - 1]} then cu_seqlens[{bad}]={bounds[bad]}")
    return bounds


def documents_key(bounds: Optional[Tuple[int, ...]]):
    """A short, comparable description of the documents (error messages show it)."""
    if bounds is None:
        return None
    digest = hashlib.blake2b(repr(bounds).encode(), digest_size=6).hexdigest()
    return (f"{len(bounds) - 1} documents", digest)


def _merge_runs(runs: List[Run]) -> List[Run]:
    """Adjacent stride-1 runs in local order joined, empty ones dropped, local offsets set."""
    out: List[Run] = []
    for run in runs:
        if run.length == 0:
            continue
        if out and run.stride == 1 and out[-1].stride == 1 and out[-1].start + out[-1].length == run.start:
            last = out.pop()
            run = Run(last.start, last.length + run.length, 1, 0)
        out.append(run)
    offset, placed = 0, []
    for run in out:
        placed.append(Run(run.start, run.length, run.stride, offset))
        offset += run.length
    return placed


def _zigzag_runs(start: int, length: int, world: int, rank: int) -> List[Run]:
    """Rank `rank`'s chunks r and 2P-1-r of the range [start, start + length)."""
    sizes = split_sizes(length, 2 * world)
    first, second = rank, 2 * world - 1 - rank
    return [Run(start + sum(sizes[:first]), sizes[first], 1, 0), Run(start + sum(sizes[:second]), sizes[second], 1, 0)]


def _causal_work(length: int) -> int:
    return length * (length + 1) // 2


@lru_cache(maxsize=64)
def _layout_runs(seq_len: int, scheme: str, world: int, documents: Optional[Tuple[int, ...]]) -> List[List[Run]]:
    """Every rank's runs (a function of the geometry only, so every rank computes the same)."""
    n, p = seq_len, world
    if scheme == "stripe":
        return [[Run(r, len(range(r, n, p)), p, 0)] for r in range(p)]
    if scheme == "contiguous":
        sizes = split_sizes(n, p)
        return [[Run(sum(sizes[:r]), sizes[r], 1, 0)] for r in range(p)]
    docs = [(0, n)] if documents is None else list(zip(documents[:-1], documents[1:]))
    # without documents "balanced" is zigzag (the sequence is one document, cut however short)
    if scheme == "zigzag" or documents is None:
        return [_merge_runs([run for a, b in docs for run in _zigzag_runs(a, b - a, p, r)]) for r in range(p)]
    return _balanced_runs(docs, p)


def _balanced_runs(docs: List[Tuple[int, int]], world: int) -> List[List[Run]]:
    """Runs of the "balanced" scheme.

    The work of a document of L tokens is its causal query-key pairs, L(L+1)/2; the mean
    work per rank is W/P. Documents are first placed whole (below); if the busiest rank is
    then within `BALANCE_SLACK` of the mean, no document spans ranks. Otherwise the 1, 2,
    4, ... largest documents are cut until it is, at the latest when every document whose
    work exceeds `BALANCE_SLACK * W/P` is cut. A document that is cut is cut into
    2P zigzag chunks, one pair per rank, which balances it by itself (rank r's pair sums
    to 1/P of its work up to the rounding of uneven chunks). The other documents stay
    whole and are placed largest first, each on the rank with the least work so far
    (ties: the lowest rank). That greedy placement leaves no rank more than one placed
    document above the mean: when the busiest rank took its last document, it had the
    least work, so at most the mean; that document is at most `BALANCE_SLACK * W/P`.
    So the busiest rank's work is within `BALANCE_SLACK` (5%) of the mean plus the
    zigzag rounding, and only the long documents span ranks. Documents shorter than 2P
    tokens are never cut (their zigzag chunks would be partly empty and load the low
    ranks): when such a document outweighs 5% of the mean (a few short documents in all),
    the bound is the mean plus that document's work, under 2P^2 pairs. Deterministic in
    (documents, P): every rank computes the same assignment. Runs are stored in position
    order, so local order ascends."""
    total = sum(_causal_work(b - a) for a, b in docs)
    limit = BALANCE_SLACK * total / world
    # a document shorter than 2P has empty zigzag chunks: cutting it would load the low ranks
    cuttable = sorted((d for d in docs if d[1] - d[0] >= 2 * world), key=lambda d: (-_causal_work(d[1] - d[0]), d[0]))
    heavy = sum(1 for a, b in cuttable if _causal_work(b - a) > limit)
    # cut few documents: the largest 0, 1, 2, 4, ... until the busiest rank is within the
    # slack of the mean (at most twice the fewest cuts that balance this way, in log tries);
    # at the latest every heavy one is cut (the bound above)
    counts = [0] + [2 ** i for i in range(max(1, heavy).bit_length()) if 2 ** i < heavy] + [heavy]
    for count in sorted(set(counts)):
        pieces, load = _assign(docs, set(cuttable[:count]), world)
        if max(load) <= (1 + BALANCE_SLACK) * total / world:
            break
    return [_merge_runs(sorted(runs, key=lambda run: run.start)) for runs in pieces]


def _assign(docs: List[Tuple[int, int]], cut, world: int):
    """(runs per rank, causal work per rank): the documents in `cut` as zigzag pairs, the
    others whole, largest first, each on the least loaded rank (ties: the lowest)."""
    pieces: List[List[Run]] = [[] for _ in range(world)]
    for a, b in docs:
        if (a, b) in cut:
            for r in range(world):
                pieces[r].extend(_zigzag_runs(a, b - a, world, r))
    load = [causal_work_of(runs, docs) for runs in pieces]
    for a, b in sorted((d for d in docs if d not in cut), key=lambda d: (-(d[1] - d[0]), d[0])):
        r = min(range(world), key=lambda i: (load[i], i))
        pieces[r].append(Run(a, b - a, 1, 0))
        load[r] += _causal_work(b - a)
    return pieces, load


def causal_work_of(runs: List[Run], docs: List[Tuple[int, int]]) -> int:
    """Causal query-key pairs whose query lies in `runs` (stride-1 runs, each inside one
    document): a query at position t of a document starting at s sees t - s + 1 keys."""
    starts = [a for a, _ in docs]
    work = 0
    for run in runs:
        if run.length == 0:
            continue
        first = run.start - starts[bisect.bisect_right(starts, run.start) - 1] + 1
        work += run.length * first + run.length * (run.length - 1) // 2
    return work


def gather_global(x_local: torch.Tensor, layout: SeqLayout, dim: int) -> torch.Tensor:
    """All-gather the ranks' shards into the global tensor along `dim` (no autograd)."""
    from .comm import collectives

    moved = x_local.movedim(dim, 0).contiguous()
    shards = collectives.all_gather_uneven(moved, layout.local_lens, layout.group, op="layout.unshard")
    out = moved.new_empty((layout.seq_len,) + tuple(moved.shape[1:]))
    for rank, shard in enumerate(shards):
        out.index_copy_(0, layout.positions_of(rank, device=out.device), shard)
    return out.movedim(0, dim)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, layout, dim, reduce_grad):
        ctx.layout, ctx.dim, ctx.reduce_grad = layout, dim, reduce_grad
        if layout.world_size == 1:
            return x_local.clone()
        return gather_global(x_local, layout, dim)

    @staticmethod
    def backward(ctx, grad):
        layout = ctx.layout
        if ctx.reduce_grad and layout.world_size > 1:
            from .comm import collectives

            grad = grad.contiguous().clone()
            collectives.all_reduce_sum(grad, layout.group, op="layout.unshard.backward")
        return layout.shard(grad, ctx.dim), None, None, None


def visible_blocks(layout: SeqLayout, q_rank: int, k_rank: int, causal: bool) -> List[Block]:
    """The blocks of (rank `q_rank`'s queries) x (rank `k_rank`'s keys) that must be computed.

    Fully masked pairs are left out; neighbouring fully visible pairs are fused into one
    block so that e.g. a zigzag step is a single kernel call. With documents, runs are cut
    at document boundaries and only pieces of the same document are paired.
    """
    mask = as_mask(causal)
    geometry = getattr(layout, "geometry", None)
    if geometry is not None:
        blocks = list(_cached_blocks(geometry, q_rank, k_rank, dataclasses.replace(mask, softcap=0.0)))
    else:
        blocks = _visible_blocks(layout, q_rank, k_rank, mask)
    if mask.softcap:
        blocks = [dataclasses.replace(blk, softcap=mask.softcap) for blk in blocks]
    return blocks


@lru_cache(maxsize=4096)
def _cached_blocks(geometry: tuple, q_rank: int, k_rank: int, mask: Mask) -> Tuple[Block, ...]:
    seq_len, scheme, world, documents = geometry
    layout = SeqLayout.simulated(seq_len, world, q_rank, scheme, documents)
    return tuple(_visible_blocks(layout, q_rank, k_rank, mask))


def _visible_blocks(layout, q_rank: int, k_rank: int, mask: Mask) -> List[Block]:
    nq, nk = layout.local_len_of(q_rank), layout.local_len_of(k_rank)
    if nq == 0 or nk == 0:
        return []
    causal = mask.causal
    documents = getattr(layout, "documents", None)
    if documents is None and not mask.windowed:
        if not causal:
            return [Block(0, nq, 0, nk, None)]
        if q_rank == k_rank and _ascending(layout.runs(q_rank)):
            # positions ascend in local order, so local causality is global causality
            return [Block(0, nq, 0, nk, 0)]
    if documents is None:
        k_runs = [kr for kr in layout.runs(k_rank) if kr.length]
        pairs = [(qr, k_runs) for qr in layout.runs(q_rank) if qr.length]
    else:
        by_document = {}
        for doc, kr in _document_pieces(layout.runs(k_rank), documents):
            by_document.setdefault(doc, []).append(kr)
        pairs = [(qr, by_document[doc]) for doc, qr in _document_pieces(layout.runs(q_rank), documents)
                 if doc in by_document]
    rows = []
    for qr, k_runs in pairs:
        row = []
        for kr in k_runs:
            band = _pair_band(qr, kr, mask)
            if band is None:
                continue
            block = Block(qr.local_start, qr.length, kr.local_start, kr.length, *band)
            if row and _full(block) and _full(row[-1]) and row[-1].k_start + row[-1].k_len == block.k_start:
                prev = row.pop()
                block = Block(prev.q_start, prev.q_len, prev.k_start, prev.k_len + block.k_len, None)
            row.append(block)
        if row:
            rows.append(row)
    blocks: List[Block] = []
    for row in rows:
        if (
            blocks
            and len(row) == 1
            and _full(row[0])
            and _full(blocks[-1])
            and blocks[-1].q_start + blocks[-1].q_len == row[0].q_start
            and (blocks[-1].k_start, blocks[-1].k_len) == (row[0].k_start, row[0].k_len)
        ):
            prev = blocks.pop()
            blocks.append(Block(prev.q_start, prev.q_len + row[0].q_len, prev.k_start, prev.k_len, None))
        else:
            blocks.extend(row)
    return blocks


def _document_pieces(runs: Sequence[Run], documents: Tuple[int, ...]) -> List[Tuple[int, Run]]:
    """`(document index, piece)` of every run, cut at document boundaries, in local order."""
    pieces = []
    for run in runs:
        i = 0
        while i < run.length:
            position = run.start + run.stride * i
            doc = bisect.bisect_right(documents, position) - 1
            # positions of this run before the document's end
            count = min(run.length - i, -(-(documents[doc + 1] - position) // run.stride))
            pieces.append((doc, Run(position, count, run.stride, run.local_start + i)))
            i += count
    return pieces


def _full(block: Block) -> bool:
    return block.offset is None and block.lo is None


def _pair_band(qr: Run, kr: Run, mask: Mask) -> Optional[Tuple[Optional[int], Optional[int]]]:
    """`(offset, lo)` of the block of run `qr`'s queries against run `kr`'s keys (see Block;
    None for a side that never binds), or None when no pair is visible.

    With a common stride s and d = qr.start - kr.start, key j of kr (position
    kr.start + s j) is visible to query i of qr iff, in positions, `k <= q` (causal),
    `k <= q + right` and `k >= q - left`: `j - i <= floor(d / s)`, `<= floor((d + right) / s)`
    and `>= ceil((d - left) / s)`."""
    stride = _common_stride(qr, kr)
    d = qr.start - kr.start
    left, right = mask.window
    uppers = ([d // stride] if mask.causal else []) + ([(d + right) // stride] if right >= 0 else [])
    hi = min(uppers) if uppers else None
    lo = -((left - d) // stride) if left >= 0 else None
    nq, nk = qr.length, kr.length
    # rows i that see a key: i + lo <= nk - 1, i + hi >= 0, and lo <= hi
    first = 0 if hi is None else max(0, -hi)
    last = nq - 1 if lo is None else min(nq - 1, nk - 1 - lo)
    if first > last or (hi is not None and lo is not None and lo > hi):
        return None
    if hi is not None and hi >= nk - 1:
        hi = None
    if lo is not None and lo <= -(nq - 1):
        lo = None
    return hi, lo


def _common_stride(qr: Run, kr: Run) -> int:
    """The stride both runs' positions share (a run of one token fits any stride)."""
    if qr.length == 1:
        return kr.stride
    if kr.length == 1 or qr.stride == kr.stride:
        return qr.stride
    raise AssertionError(f"runs of strides {qr.stride} and {kr.stride} have no common stride")


def _ascending(runs: List[Run]) -> bool:
    """Whether the positions of `runs`, stored one after the other, ascend."""
    if len(runs) == 1:
        return True
    return all(
        a.stride == 1 and b.stride == 1 and a.start + a.length <= b.start for a, b in zip(runs, runs[1:])
    )


class GroupLayout:
    """The layout seen by a ring whose members are *groups* of ranks (USP's outer level).

    Member g of the ring holds the tokens of the ranks `groups[g]` of `layout`, stored as
    the runs below (adjacent stride-1 runs coalesced and sorted; stride-P runs in rank
    order). It offers what the ring loops read from a SeqLayout: `rank`, `world_size`,
    `group` (the ring's process group), `seq_len`, `local_len`, `local_len_of`, `runs`.
    """

    def __init__(self, layout: SeqLayout, groups: List[List[int]], ring_rank: int, member: int = 0):
        self.base = layout
        self.seq_len = layout.seq_len
        self.documents = getattr(layout, "documents", None)
        self.world_size = len(groups)
        self.rank = ring_rank
        # the ring is the ranks with index `member` in their group, talking on the layout's group
        self.group = layout.group
        self._peers = [members[member] for members in groups]
        member_runs = [[run for r in members for run in layout.runs(r) if run.length] for members in groups]
        if all(run.stride == 1 for runs in member_runs for run in runs):
            coalesced = [self._merge_adjacent(runs) for runs in member_runs]
        elif all(_covers_a_range(runs) for runs in member_runs):
            # e.g. stripe under plain Ulysses: every group's tokens form one range
            coalesced = [[Run(min(r.start for r in runs), sum(r.length for r in runs), 1, 0)] if runs else []
                         for runs in member_runs]
        else:
            # strides must agree between groups for the causal offsets: keep rank order
            coalesced = member_runs
        self._runs = [self._with_offsets(runs) for runs in coalesced]
        self._lens = [sum(run.length for run in runs) for runs in self._runs]
        self._members = groups

    @staticmethod
    def _merge_adjacent(runs: List[Run]) -> List[Run]:
        runs = sorted(runs, key=lambda run: run.start)
        merged = runs[:1]  # a group may hold no token (documents)
        for run in runs[1:]:
            last = merged[-1]
            if last.start + last.length == run.start:
                merged[-1] = Run(last.start, last.length + run.length, 1, 0)
            else:
                merged.append(run)
        return merged

    @staticmethod
    def _with_offsets(runs: List[Run]) -> List[Run]:
        out, offset = [], 0
        for run in runs:
            out.append(Run(run.start, run.length, run.stride, offset))
            offset += run.length
        return out

    def peer(self, rank: int) -> int:
        """The rank of the layout's group that is member `rank` of this ring."""
        return self._peers[rank]

    def runs(self, rank: Optional[int] = None) -> List[Run]:
        return self._runs[self.rank if rank is None else rank]

    def local_len_of(self, rank: int) -> int:
        return self._lens[rank]

    @property
    def local_len(self) -> int:
        return self._lens[self.rank]

    def local_index(self, member: int) -> torch.Tensor:
        """Where rank `member`'s tokens (in its local order) sit in its group's storage."""
        g = next(i for i, members in enumerate(self._members) if member in members)
        storage_positions = torch.cat([torch.empty(0, dtype=torch.long)] + [
            torch.arange(run.start, run.start + run.stride * run.length, run.stride) for run in self._runs[g]
        ])
        order = torch.empty(self.seq_len, dtype=torch.long)
        order[storage_positions] = torch.arange(len(storage_positions))
        return order[self.base.positions_of(member)]


def _covers_a_range(runs: List[Run]) -> bool:
    if not runs:
        return True
    positions = torch.cat([torch.arange(r.start, r.start + r.stride * r.length, r.stride) for r in runs]).sort().values
    return bool(torch.equal(positions, torch.arange(int(positions[0]), int(positions[0]) + len(positions))))
