"""The CPU causal tree (`pieces.causal_tree*`): a square causal piece as batched leaves and
unmasked blocks, exact against dense attention, NaN rule kept, in every memory layout."""
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from seqpar.kernels import pieces
from seqpar.kernels.backends import sdpa, torch_math
from seqpar.kernels.reference import dense_attention

NAN = float("nan")


def _torch_piece_fwd(q, k, v, scale, causal):
    return torch_math.forward(q, k, v, scale, 0 if causal else None)


def _torch_piece_bwd(do, q, k, v, out, lse, scale, causal):
    return torch_math.backward(do, q, k, v, out, lse, scale, 0 if causal else None)


PIECES = {"sdpa": (sdpa._piece_forward, sdpa._piece_backward), "torch": (_torch_piece_fwd, _torch_piece_bwd)}


@given(st.integers(0, 70), st.integers(1, 9))
def test_causal_tree_covers_exactly_the_triangle(n, leaf):
    n0, sizes = pieces.causal_tree(n, leaf)
    if n < 2 * leaf:
        assert (n0, sizes) == (0, [])
        return
    assert n0 % leaf == 0 and n0 <= n < 2 * n0 and n0 >= 2 * leaf
    covered = torch.zeros(n0, n0, dtype=torch.int64)
    for r in range(0, n0, leaf):  # the leaves
        covered[r:r + leaf, r:r + leaf] += torch.tril(torch.ones(leaf, leaf, dtype=torch.int64))
    for s in sizes:
        for j in range(n0 // (2 * s)):
            covered[2 * j * s + s:2 * j * s + 2 * s, 2 * j * s:2 * j * s + s] += 1
    assert torch.equal(covered, torch.tril(torch.ones(n0, n0, dtype=torch.int64)))


def _layout(x, how):
    """The same values in another memory layout: heads-major storage, or a slice of a wider buffer."""
    if how == "contiguous":
        return x
    if how == "heads_major":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.zeros(x.shape[:-1] + (x.shape[-1] + 3,), dtype=x.dtype)
    wide[..., 1:1 + x.shape[-1]] = x
    return wide[..., 1:1 + x.shape[-1]]


@settings(deadline=None, max_examples=40)
@given(n=st.integers(2, 40), leaf=st.integers(1, 6), kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 2]),
       batch=st.sampled_from([1, 2]), piece=st.sampled_from(sorted(PIECES)),
       how=st.sampled_from(["contiguous", "heads_major", "sliced"]), seed=st.integers(0, 1000))
def test_causal_tree_matches_dense_float64(n, leaf, kv_heads, group, batch, piece, how, seed):
    gen = torch.Generator().manual_seed(seed)
    heads, d = kv_heads * group, 8
    q, do = (torch.randn(batch, n, heads, d, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(batch, n, kv_heads, d, generator=gen, dtype=torch.float64) for _ in range(2))
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = dense_attention(qr, kr, vr, causal=True, softmax_scale=0.4, return_lse=True)
    ref_grads = torch.autograd.grad(ref_out, (qr, kr, vr), do)
    fwd, bwd = PIECES[piece]
    q, k, v, do = (_layout(t, how) for t in (q, k, v, do))
    assume(n >= 2 * leaf)  # below two leaves there is no tree
    out, lse = pieces.causal_tree_forward(fwd, q, k, v, 0.4, leaf)
    assert out.dtype == lse.dtype == torch.float64 and out.is_contiguous()
    torch.testing.assert_close(out, ref_out.detach(), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(lse, ref_lse.detach(), rtol=1e-11, atol=1e-11)
    grads = pieces.causal_tree_backward(bwd, do, q, k, v, ref_out.detach(), ref_lse.detach(), 0.4, leaf)
    for got, want in zip(grads, ref_grads):
        assert got.is_contiguous() and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("leaf", [2, 4])
def test_causal_tree_keeps_the_nan_rule(where, leaf):
    """PyTorch's CPU op drops a NaN in a row that sees few keys; every leaf's rows do. The
    tree restores those rows: every row that depends on the NaN is NaN, and with a NaN query
    or key the others stay finite."""
    gen = torch.Generator().manual_seed(0)
    for n in range(2 * leaf, 23):
        for j in range(n):
            q, k, v = (torch.randn(1, n, h, 8, generator=gen, dtype=torch.float32) for h in (2, 1, 1))
            {"q": q, "k": k, "v": v}[where][0, j, 0, 3] = NAN
            out, lse = pieces.causal_tree_forward(sdpa._piece_forward, q, k, v, 8 ** -0.5, leaf)
            rows = torch.arange(n)
            depends = rows == j if where == "q" else rows >= j
            for h in (0, 1) if where != "q" else (0,):
                nan_rows = out[0, :, h].isnan().any(-1)
                # a NaN value may also reach rows of its call that do not see it (0 * NaN, as in SDPA)
                assert torch.equal(nan_rows & depends if where == "v" else nan_rows, depends), (n, j, h)
                if where != "v":
                    assert torch.equal(lse[0, h].isnan(), depends), (n, j, h)


def test_sdpa_uses_the_tree_where_timed_faster_and_stays_exact(monkeypatch):
    """The sdpa backend's CPU pieces at sizes that take the tree (the backward's first size;
    the forward's first, batch 2; an uneven size with tail rows) against the torch math
    backend in float64, with GQA."""
    calls = []
    tree_fwd, tree_bwd = pieces.causal_tree_forward, pieces.causal_tree_backward
    monkeypatch.setattr(sdpa, "causal_tree_forward", lambda *a, **kw: calls.append("fwd") or tree_fwd(*a, **kw))
    monkeypatch.setattr(sdpa, "causal_tree_backward", lambda *a, **kw: calls.append("bwd") or tree_bwd(*a, **kw))
    gen = torch.Generator().manual_seed(1)
    assert sdpa.forward_takes_tree(512) and not sdpa.forward_takes_tree(512 + 64)  # whole doubled leaves only
    for n, batch in ((sdpa.CPU_TREE_BACKWARD_ROWS, 1), (sdpa.CPU_TREE_FORWARD_ROWS[0], 2), (777, 1)):
        q, do = (torch.randn(batch, n, 4, 16, generator=gen, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(batch, n, 2, 16, generator=gen, dtype=torch.float64) for _ in range(2))
        calls.clear()
        out, lse = sdpa.forward(q, k, v, 0.25, 0)
        want_out, want_lse = torch_math.forward(q, k, v, 0.25, 0)
        torch.testing.assert_close(out, want_out, rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(lse, want_lse, rtol=1e-11, atol=1e-11)
        grads = sdpa.backward(do, q, k, v, out, lse, 0.25, 0)
        for got, want in zip(grads, torch_math.backward(do, q, k, v, want_out, want_lse, 0.25, 0)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        # (777 rows: the backward's tail rows, 265, take a tree of their own)
        assert ("fwd" in calls) == sdpa.forward_takes_tree(n) and "bwd" in calls, (n, calls)
