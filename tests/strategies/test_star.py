"""Star attention on real gloo worlds: phase 1 against a dense reference of its mask,
phase 2 against dense attention, forward and gradients, float64 and low precision;
communication volumes; errors that must raise on every rank."""
import re
from dataclasses import dataclass
from typing import Tuple

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import seqpar
from seqpar.kernels.reference import dense_attention, star_context_mask
from seqpar.layout import SeqLayout, gather_global, split_sizes
from seqpar.strategies.star import context_analytic_bytes, query_analytic_bytes
from seqpar.testing import AttentionProblem, assert_matches_dense, world
from seqpar.testing.checks import (DTYPES, MEMORY_LAYOUTS, _rel_err, batch_mean, conditioning, lay_out, lay_out_grad,
                                   leaf_grads, same_batch_rows)
from seqpar.testing.strategies import attention_problems


def _grads(q, k, v, do, attend):
    """out, dq, dk, dv of `attend(q, k, v)` by autograd, on detached copies."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attend(q, k, v)
    out.backward(do)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _sdpa(q, k, v, mask, scale):
    """Dense PyTorch SDPA in the inputs' dtype (the yardstick for low precision)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


# -- phase 1 --------------------------------------------------------------------------


def _check_context(problem: AttentionProblem, anchor_len: int, backend: str = "auto"):
    """On every rank: star_attention against float64 dense attention under the phase-1 mask;
    returns a report in `check_attention`'s format (identical on every rank)."""
    layout = SeqLayout(problem.seq_len)
    dtype = DTYPES[problem.dtype]
    q, k, v, do = problem.global_tensors()
    mem = problem.memory_layout
    leaves, views = lay_out([layout.shard(t).to(dtype) for t in (q, k, v)], mem)
    out = seqpar.star_attention(*views, layout=layout, anchor_len=anchor_len, softmax_scale=problem.softmax_scale,
                                backend=backend)
    assert out.dtype == dtype and out.shape == views[0].shape and out.is_contiguous()
    out.backward(lay_out_grad(layout.shard(do).to(dtype), mem))
    dq, dk, dv = leaf_grads(leaves, mem, problem.batch)
    ours = {"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}
    for name, t in ours.items():
        assert t.dtype == dtype and torch.isfinite(t).all(), name
    ours = {name: gather_global(t, layout, 1) if layout.world_size > 1 else t for name, t in ours.items()}
    mask = star_context_mask(layout.local_lens, anchor_len)
    ref = batch_mean(_grads(q, k, v, do, lambda *t: dense_attention(*t, softmax_scale=problem.softmax_scale,
                                                                    mask=mask)), mem)
    dense = batch_mean(_grads(*(t.to(dtype) for t in (q, k, v)), do.to(dtype),
                              lambda *t: _sdpa(*t, mask, problem.softmax_scale)), mem)
    report = {f"err_{name}": _rel_err(ours[name], ref[name]) for name in ref}
    report.update({f"dense_{name}": _rel_err(dense[name], ref[name]) for name in ref})
    # cancelled quantities are judged against the rounding of their terms, as check_attention does
    report.update(conditioning(q, k, v, do, False, problem.softmax_scale, ref, mask=mask))
    return report


@st.composite
def context_problems(draw):
    # Star: one head dim, no sinks
    problem = draw(attention_problems(schemes=("contiguous",), value_dims=False, sinks=False))
    n0 = split_sizes(problem.seq_len, problem.world_size)[0]
    return problem, draw(st.integers(0, n0))


@given(case=context_problems())
def test_context_matches_its_dense_mask_hypothesis(case):
    problem, anchor_len = case
    assert_matches_dense(problem, world(problem.world_size).run(_check_context, problem, anchor_len)[0])


CONTEXT_CASES = {
    "p2_full_anchor_is_causal": (AttentionProblem(2, 13, heads=4, kv_heads=2, causal=True), 7),
    "p3_uneven_gqa": (AttentionProblem(3, 31, heads=6, kv_heads=2, head_dim=12), 4),
    "p4_no_anchor": (AttentionProblem(4, 21, heads=4, kv_heads=1, dtype="float32"), 0),
    "p4_one_token_blocks": (AttentionProblem(4, 4, heads=2, kv_heads=2), 1),
    "p3_fp16": (AttentionProblem(3, 40, heads=4, kv_heads=2, head_dim=16, dtype="float16"), 5),
    "p2_bf16_saturated": (AttentionProblem(2, 24, heads=4, kv_heads=4, dtype="bfloat16", logit_scale=16.0), 12),
    "p1": (AttentionProblem(1, 9, heads=4, kv_heads=2, dtype="float32"), 3),
}


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("name", sorted(CONTEXT_CASES))
def test_context_cases(name, backend):
    problem, anchor_len = CONTEXT_CASES[name]
    assert_matches_dense(problem, world(problem.world_size).run(_check_context, problem, anchor_len, backend)[0])


def test_full_anchor_on_two_ranks_is_exact_causal_attention():
    # the reference mask itself: with P = 2 and anchor = rank 0's block, nothing is left out
    assert torch.equal(star_context_mask([7, 6], 7), torch.ones(13, 13, dtype=torch.bool).tril())
    assert not torch.equal(star_context_mask([5, 4, 4], 5), torch.ones(13, 13, dtype=torch.bool).tril())


def _context_no_grad():
    layout = SeqLayout(10)
    q = torch.randn(1, layout.local_len, 4, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        out = seqpar.star_attention(q, q[:, :, :2], q[:, :, :2], layout=layout, anchor_len=2)
    return out.dtype, tuple(out.shape), out.requires_grad


def test_context_under_no_grad():
    assert world(2).run(_context_no_grad) == [(torch.bfloat16, (1, 5, 4, 8), False)] * 2


# -- phase 2 --------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryProblem:
    """Replicated queries over a KV sequence whose rank r holds `kv_lens[r]` tokens."""

    kv_lens: Tuple[int, ...]
    n_q: int
    batch: int = 1
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    causal: bool = True
    dtype: str = "float64"
    logit_scale: float = 1.0
    give_lens: bool = False
    seed: int = 0
    memory_layout: str = "contiguous"  # checks.MEMORY_LAYOUTS: how q, k, v and dO are stored

    @property
    def world_size(self) -> int:
        return len(self.kv_lens)

    @property
    def softmax_scale(self) -> float:
        return self.logit_scale * self.head_dim ** -0.5

    def global_tensors(self):
        gen = torch.Generator().manual_seed(self.seed)
        b, m, d = self.batch, sum(self.kv_lens), self.head_dim
        q = torch.randn(b, self.n_q, self.heads, d, generator=gen, dtype=torch.float64)
        k = torch.randn(b, m, self.kv_heads, d, generator=gen, dtype=torch.float64)
        v = torch.randn(b, m, self.kv_heads, d, generator=gen, dtype=torch.float64)
        do = torch.randn(b, self.n_q, self.heads, d, generator=gen, dtype=torch.float64)
        return tuple(same_batch_rows((q, k, v, do), self.memory_layout))


def _check_query(problem: QueryProblem, backend: str = "auto"):
    """On every rank: star_query_attention against float64 dense attention. Returns the
    errors of out, dq and this rank's dk, dv (relative to the global reference's largest
    value), dense SDPA's errors, and the output (to compare across ranks)."""
    rank = dist.get_rank() if problem.world_size > 1 else 0
    dtype = DTYPES[problem.dtype]
    q, k, v, do = problem.global_tensors()
    total, start = sum(problem.kv_lens), sum(problem.kv_lens[:rank])
    mine = slice(start, start + problem.kv_lens[rank])
    mem = problem.memory_layout
    leaves, views = lay_out([q.to(dtype), k[:, mine].to(dtype), v[:, mine].to(dtype)], mem)
    out = seqpar.star_query_attention(*views, causal=problem.causal, softmax_scale=problem.softmax_scale,
                                      backend=backend, kv_lens=list(problem.kv_lens) if problem.give_lens else None)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    out.backward(lay_out_grad(do.to(dtype), mem))
    dq, dk, dv = leaf_grads(leaves, mem, problem.batch)
    ours = {"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}
    for name, t in ours.items():
        assert t.dtype == dtype and torch.isfinite(t).all(), name
    q_pos, k_pos = torch.arange(total - problem.n_q, total), torch.arange(total)
    ref = _grads(q, k, v, do, lambda *t: dense_attention(*t, causal=problem.causal, q_positions=q_pos,
                                                         k_positions=k_pos, softmax_scale=problem.softmax_scale))
    # SDPA gives NaN for rows that see no key: it runs on the rows that see one
    seen = slice(max(0, problem.n_q - total) if problem.causal else 0, problem.n_q)
    low = [t.to(dtype) for t in (q[:, seen], k, v, do[:, seen])]
    mask = (k_pos[None, :] <= q_pos[seen, None]) if problem.causal else None
    dense = {"out": torch.zeros_like(ref["out"]), "dq": torch.zeros_like(ref["dq"]),
             "dk": torch.zeros_like(ref["dk"]), "dv": torch.zeros_like(ref["dv"])}
    if low[0].shape[1] and total:
        part = _grads(*low, lambda *t: _sdpa(*t, mask, problem.softmax_scale))
        dense["out"][:, seen], dense["dq"][:, seen] = part["out"].double(), part["dq"].double()
        dense["dk"], dense["dv"] = part["dk"].double(), part["dv"].double()
    ref, dense = batch_mean(ref, mem), batch_mean(dense, mem)
    report = {}
    for name in ("out", "dq", "dk", "dv"):
        scale = ref[name].abs().max().item() if ref[name].numel() else 1.0
        got, want = ours[name].double(), ref[name][:, mine] if name in ("dk", "dv") else ref[name]
        report[f"err_{name}"] = (got - want).abs().max().item() / (scale or 1.0) if got.numel() else 0.0
        report[f"dense_{name}"] = _rel_err(dense[name], ref[name]) if ref[name].numel() else 0.0
    if total:
        visible = (k_pos[None, :] <= q_pos[:, None] if problem.causal
                   else torch.ones(problem.n_q, total, dtype=torch.bool))
        report.update(conditioning(q, k, v, do, False, problem.softmax_scale, ref, mask=visible))
    report["out"] = out.detach()
    return report


def _assert_query(problem: QueryProblem, backend: str = "auto"):
    reports = world(problem.world_size).run(_check_query, problem, backend)
    outs = [report.pop("out") for report in reports]
    for rank, report in enumerate(reports):
        assert torch.equal(outs[rank], outs[0]), f"rank {rank}'s output differs from rank 0's"
        assert_matches_dense(problem, report)


@st.composite
def query_problems(draw, dtypes=("float64", "float32", "bfloat16")):
    """P 1-4, per-rank KV lengths 0-9 (zeros and all-empty included), 1-12 queries (more
    than M: rows that see nothing), MHA/GQA/MQA, causal or not, given or gathered lengths."""
    world_size = draw(st.integers(1, 4))
    kv_heads = draw(st.sampled_from([1, 2, 3]))
    return QueryProblem(
        kv_lens=tuple(draw(st.lists(st.integers(0, 9), min_size=world_size, max_size=world_size))),
        n_q=draw(st.integers(1, 12)),
        batch=draw(st.integers(1, 2)),
        heads=kv_heads * draw(st.sampled_from([1, 2, 4])),
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([4, 8, 12, 33])),
        causal=draw(st.booleans()),
        dtype=draw(st.sampled_from(list(dtypes))),
        logit_scale=draw(st.sampled_from([0.5, 1.0, 4.0, 16.0])),
        give_lens=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        memory_layout=draw(st.sampled_from(MEMORY_LAYOUTS)),
    )


@given(problem=query_problems())
def test_query_matches_dense_hypothesis(problem):
    _assert_query(problem)


QUERY_CASES = {
    # the last rank's 2 keys are later than queries 0-2: those rows see nothing there (lse -inf)
    "rows_masked_on_last_rank": QueryProblem((5, 3, 2), n_q=5),
    "empty_middle_rank": QueryProblem((4, 0, 3), n_q=3, kv_heads=1),
    "only_last_rank_holds_kv": QueryProblem((0, 0, 0, 2), n_q=4, heads=6, kv_heads=3),
    "more_queries_than_keys": QueryProblem((1, 0, 2), n_q=6, give_lens=True),
    "no_kv_anywhere": QueryProblem((0, 0), n_q=2),
    "no_kv_anywhere_noncausal": QueryProblem((0, 0), n_q=2, causal=False),
    "decode_one_token": QueryProblem((7, 6, 6, 1), n_q=1, batch=2, give_lens=True),
    "noncausal_uneven": QueryProblem((9, 1, 0, 4), n_q=3, causal=False, head_dim=33),
    "single_rank": QueryProblem((6,), n_q=3, dtype="float32"),
    "fp16": QueryProblem((8, 7, 3), n_q=4, head_dim=16, dtype="float16"),
    "bf16_saturated": QueryProblem((6, 6), n_q=5, dtype="bfloat16", logit_scale=16.0),
    "fp32_mqa": QueryProblem((5, 5, 5, 5), n_q=7, heads=8, kv_heads=1, dtype="float32"),
}


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("name", sorted(QUERY_CASES))
def test_query_cases(name, backend):
    _assert_query(QUERY_CASES[name], backend)


def test_query_last_rank_rows_see_nothing_on_that_rank():
    # the case above is what it claims: offset M - n_q - s_r = 10 - 5 - 8 = -3 on rank 2
    from seqpar.strategies.star import _query_blocks

    (blk,) = _query_blocks((5, 3, 2), 2, 5, True)
    assert blk.offset == -3 and all(j > i + blk.offset for i in range(3) for j in range(2))


# -- volumes --------------------------------------------------------------------------


def _context_bytes(seq_len, anchor_len, dtype):
    layout = SeqLayout(seq_len)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, layout.local_len, 4, 8, generator=gen).to(getattr(torch, dtype)).requires_grad_()
    k, v = (torch.randn(2, layout.local_len, 2, 8, generator=gen).to(q.dtype).requires_grad_() for _ in range(2))
    with seqpar.comm.track() as fwd:
        out = seqpar.star_attention(q, k, v, layout=layout, anchor_len=anchor_len)
    with seqpar.comm.track() as bwd:
        out.backward(torch.ones_like(out))
    expected = context_analytic_bytes(layout, 2, 2, 8, q.element_size(), anchor_len)
    measured = {"forward": fwd.bytes_sent("star"), "backward": bwd.bytes_sent("star"),
                "forward_received": fwd.bytes_received("star"), "ops": sorted(set(fwd.ops) | set(bwd.ops))}
    return expected, measured


@pytest.mark.parametrize("world_size, seq_len, anchor_len, dtype", [
    (2, 16, 8, "float32"), (3, 31, 5, "bfloat16"), (4, 22, 6, "float64"), (3, 12, 0, "float32"),
])
def test_context_moves_exactly_the_analytic_volume(world_size, seq_len, anchor_len, dtype):
    results = world(world_size).run(_context_bytes, seq_len, anchor_len, dtype)
    element = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    anchor = 2 * 2 * anchor_len * 2 * 8
    for rank, (expected, measured) in enumerate(results):
        assert measured["forward"] == expected["forward"], rank
        assert measured["backward"] == expected["backward"], rank
        # every rank but 0 receives the anchor once; all but the last forward it, all but 0 return its grad
        assert measured["forward_received"] == (anchor * element if rank else 0), rank
        assert expected["forward"] == (anchor * element if rank < world_size - 1 else 0), rank
        assert expected["backward"] == (anchor * (8 if dtype == "float64" else 4) if rank else 0), rank
        assert all(op == "check" or op.startswith("star.context.") for op in measured["ops"]), measured["ops"]
        assert ("star.context.anchor" in measured["ops"]) == (anchor_len > 0)


def _query_bytes(problem: QueryProblem):
    rank = dist.get_rank()
    dtype = DTYPES[problem.dtype]
    q, k, v, do = problem.global_tensors()
    start = sum(problem.kv_lens[:rank])
    mine = slice(start, start + problem.kv_lens[rank])
    ql = q.to(dtype).detach().clone().requires_grad_()
    kl, vl = (t[:, mine].to(dtype).detach().clone().requires_grad_() for t in (k, v))
    with seqpar.comm.track() as fwd:
        out = seqpar.star_query_attention(ql, kl, vl, causal=problem.causal,
                                          kv_lens=list(problem.kv_lens) if problem.give_lens else None)
    with seqpar.comm.track() as bwd:
        out.backward(do.to(dtype))
    expected = query_analytic_bytes(problem.world_size, problem.batch, problem.n_q, problem.heads, problem.head_dim,
                                    ql.element_size(), causal=problem.causal, kv_lens_given=problem.give_lens)
    return expected, {"forward": fwd.bytes_sent("star"), "backward": bwd.bytes_sent("star"),
                      "forward_received": fwd.bytes_received("star"), "ops": sorted(set(fwd.ops) | set(bwd.ops))}


@pytest.mark.parametrize("problem", [
    QueryProblem((5, 0, 3), n_q=4, batch=2, dtype="float32"),
    QueryProblem((5, 0, 3), n_q=4, batch=2, dtype="float32", give_lens=True),
    QueryProblem((2, 2, 2, 2), n_q=1, heads=8, kv_heads=2, head_dim=16, dtype="bfloat16", causal=False),
    QueryProblem((3, 4), n_q=3, dtype="float64"),
])
def test_query_moves_exactly_the_analytic_volume(problem):
    p, rows, d = problem.world_size, problem.batch * problem.n_q * problem.heads, problem.head_dim
    c = 8 if problem.dtype == "float64" else 4
    for rank, (expected, measured) in enumerate(world(p).run(_query_bytes, problem)):
        assert measured["forward"] == expected["forward"] == measured["forward_received"], rank
        assert measured["backward"] == expected["backward"], rank
        # the textbook formulas, independently of the counters
        lens = 8 * (p - 1) if problem.causal and not problem.give_lens else 0
        assert expected["forward"] == 2 * (p - 1) * rows * c // p + 2 * (p - 1) * rows * (d + 1) * c // p + lens
        assert expected["backward"] == 2 * (p - 1) * rows * d * c // p
        assert ("star.query.lens" in measured["ops"]) == (problem.causal and not problem.give_lens)
        assert all(op == "check" or op.startswith("star.query.") for op in measured["ops"]), measured["ops"]


def test_query_all_reduce_form_beats_all_gather_from_three_ranks():
    for p in (3, 4, 8, 64):
        got = query_analytic_bytes(p, 1, 1, 32, 128, 2, kv_lens_given=True)
        assert got["forward"] < got["allgather_forward"], p
    got = query_analytic_bytes(2, 1, 1, 32, 128, 2, kv_lens_given=True)
    assert got["forward"] == got["allgather_forward"] * 130 // 129  # D + 2 against D + 1 at P = 2


# -- errors ---------------------------------------------------------------------------


def _qkv(n=6, b=1, h=4, h_kv=2, d=8, dtype=torch.float32):
    return (torch.randn(b, n, h, d, dtype=dtype), torch.randn(b, n, h_kv, d, dtype=dtype),
            torch.randn(b, n, h_kv, d, dtype=dtype))


q6, k6, v6 = _qkv()
CONTEXT_ERRORS = [
    ("zigzag", dict(layout=SeqLayout(6, scheme="zigzag"), anchor_len=1), ValueError,
     "layout: expected scheme 'contiguous' .* got 'zigzag'"),
    ("anchor_too_long", dict(anchor_len=7), ValueError, r"anchor_len: expected an int in \[0, 6\] .* got 7"),
    ("anchor_negative", dict(anchor_len=-1), ValueError, r"anchor_len: expected an int in \[0, 6\]"),
    ("anchor_float", dict(anchor_len=2.0), TypeError, "anchor_len: expected an int, got float"),
    ("anchor_bool", dict(anchor_len=True), TypeError, "anchor_len: expected an int, got bool"),
    ("local_len", dict(layout=SeqLayout(7), anchor_len=1), ValueError, "q: expected local seqlen 7"),
    ("scale", dict(anchor_len=1, softmax_scale="x"), TypeError, "softmax_scale: expected a float or None"),
    ("backend", dict(anchor_len=1, backend="cudnn"), ValueError, "backend: expected one of"),
]


@pytest.mark.parametrize("name, kwargs, err, match", CONTEXT_ERRORS, ids=[c[0] for c in CONTEXT_ERRORS])
def test_context_bad_input_single_process(name, kwargs, err, match):
    with pytest.raises(err, match=match):
        seqpar.star_attention(q6, k6, v6, **kwargs)


QUERY_ERRORS = [
    ("kv_heads", dict(k=torch.randn(1, 3, 3, 8), v=torch.randn(1, 3, 3, 8)), ValueError,
     "k: expected a number of KV heads that divides q's 4 heads, got 3"),
    ("q_3d", dict(q=q6[0]), ValueError, r"q: expected 4 dims"),
    ("causal", dict(causal=1), TypeError, "causal: expected a bool, got int"),
    ("kv_lens_entry", dict(kv_lens=[5]), ValueError, "kv_lens: expected entry 0 to be this rank's KV length 6, got 5"),
    ("kv_lens_count", dict(kv_lens=[6, 0]), ValueError, r"kv_lens: expected 1 non-negative ints \(one per rank\)"),
    ("kv_lens_type", dict(kv_lens="6"), TypeError, "kv_lens: expected a list of ints or None"),
]


@pytest.mark.parametrize("name, kwargs, err, match", QUERY_ERRORS, ids=[c[0] for c in QUERY_ERRORS])
def test_query_bad_input_single_process(name, kwargs, err, match):
    args = dict(q=q6, k=k6, v=v6)
    args.update({key: kwargs.pop(key) for key in ("q", "k", "v") if key in kwargs})
    with pytest.raises(err, match=match):
        seqpar.star_query_attention(args["q"], args["k"], args["v"], **kwargs)


def _bad_on_one_rank(case: str):
    """Every rank calls Star attention; the last rank alone gets the bad argument."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    bad = rank == world_size - 1
    layout = SeqLayout(6 * world_size, scheme="zigzag" if case == "zigzag" else "contiguous")
    q, k, v = _qkv(layout.local_len)
    if case in ("zigzag", "anchor_too_long"):
        return seqpar.star_attention(q, k, v, layout=layout, anchor_len=7 if case == "anchor_too_long" else 1)
    if case == "anchor_differs":
        return seqpar.star_attention(q, k, v, layout=layout, anchor_len=3 if bad else 2)
    if case == "context_local_error":
        k, v = (k[:, :-1], v[:, :-1]) if bad else (k, v)
        return seqpar.star_attention(q, k, v, layout=layout, anchor_len=1)
    kv = _qkv(rank + 1)[1:]
    if case == "query_n_q_differs":
        return seqpar.star_query_attention(_qkv(3 if bad else 2)[0], *kv)
    if case == "query_dtype_differs":
        return seqpar.star_query_attention(*((t.double() for t in (q[:, :2],) + kv) if bad else (q[:, :2],) + kv))
    if case == "query_kv_lens_differ":
        lens = [r + 1 for r in range(world_size)]
        return seqpar.star_query_attention(q[:, :2], *kv, kv_lens=lens[:-1] + [0] if bad else lens)
    raise AssertionError(case)


MISMATCHES = [
    ("zigzag", "layout: expected scheme 'contiguous'"),
    ("anchor_too_long", r"anchor_len: expected an int in \[0, 6\]"),
    ("anchor_differs", "anchor_len must be the same on every rank"),
    ("context_local_error", "k: expected local seqlen"),
    ("query_n_q_differs", "q [batch, n_q, heads, head_dim], dtype, device must be the same on every rank"),
    ("query_dtype_differs", "q [batch, n_q, heads, head_dim], dtype, device must be the same on every rank"),
    ("query_kv_lens_differ", "kv_lens: expected entry"),
]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("case, match", MISMATCHES, ids=[c[0] for c in MISMATCHES])
def test_bad_input_raises_on_every_rank(world_size, case, match):
    results = world(world_size).run(_bad_on_one_rank, case, return_exceptions=True, timeout=60)
    for rank, outcome in enumerate(results):
        assert isinstance(outcome, (ValueError, TypeError)), f"rank {rank} returned {outcome!r}"
        assert re.search(match, str(outcome)) or match in str(outcome), f"rank {rank}: {outcome}"
    if case == "context_local_error":
        assert f"rank {world_size - 1} of the group got bad input" in str(results[0])


# -- memory layouts -------------------------------------------------------------------


@pytest.mark.parametrize("memory_layout", MEMORY_LAYOUTS)
def test_context_any_memory_layout(memory_layout):
    problem = AttentionProblem(2, 13, batch=2, heads=4, kv_heads=2, head_dim=6, seed=5, memory_layout=memory_layout)
    assert_matches_dense(problem, world(2).run(_check_context, problem, 3)[0])


@pytest.mark.parametrize("memory_layout", MEMORY_LAYOUTS)
def test_query_any_memory_layout(memory_layout):
    _assert_query(QueryProblem(kv_lens=(7, 5), n_q=4, batch=2, heads=4, kv_heads=2, head_dim=6, seed=5,
                               memory_layout=memory_layout))
