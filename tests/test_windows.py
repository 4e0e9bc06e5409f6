"""Sliding windows (`window_size=(left, right)`, flash-attn's convention in global
positions): the blocks that are computed, the kernels' band path, every strategy x scheme,
with documents, and bad input."""
import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.kernels import backends, block
from seqpar.kernels.reference import dense_attention
from seqpar.layout import Mask, SeqLayout, visible_blocks
from seqpar.testing import AttentionProblem, assert_matches_dense, check_attention, world
from seqpar.testing.checks import visibility


@pytest.mark.parametrize("backend", ["torch", "sdpa", "triton"])
@pytest.mark.parametrize("nq, nk, offset, lo", [
    (10, 10, 0, -3), (10, 14, 5, -2), (7, 20, None, 4), (12, 9, 3, -8), (5, 5, 0, 0), (16, 16, 2, -1), (3, 30, 25, 10),
])
def test_band_blocks_match_dense(backend, nq, nk, offset, lo):
    """A block whose keys are bounded below (`lo`) as well: natively (torch) or cut into
    one-sided blocks, the lower-bounded ones computed on reversed rows and keys."""
    if backends.unavailable_reason(backend, torch.device("cpu"), torch.float32, 8) is not None:
        pytest.skip(backends.unavailable_reason(backend, torch.device("cpu"), torch.float32, 8))
    dtype = torch.float64 if backend == "torch" else torch.float32
    gen = torch.Generator().manual_seed(nq * 100 + nk)
    q, do = (torch.randn(1, nq, 4, 8, generator=gen, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(1, nk, 2, 8, generator=gen, dtype=dtype) for _ in range(2))
    i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
    mask = j >= i + lo
    if offset is not None:
        mask &= j <= i + offset
    fwd, bwd = block.kernels(backend, q, k)
    out, lse = fwd(q, k, v, 0.3, offset, lo)
    leaves = [t.double().clone().requires_grad_() for t in (q, k, v)]
    ref = dense_attention(*leaves, softmax_scale=0.3, mask=mask)
    ref.backward(do.double())
    seen = mask.any(1)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert (out[:, seen].double() - ref[:, seen]).abs().max() <= tol
    grads = bwd(do, q, k, v, out.to(dtype), lse, 0.3, offset, lo)
    for got, leaf in zip(grads, leaves):
        assert (got.double() - leaf.grad).abs().max() <= tol


def test_a_narrow_causal_window_computes_only_neighbouring_blocks():
    """Contiguous, P=4, N=32, causal window 4: rank r's queries see ranks r and r-1 only."""
    n, p = 32, 4
    mask = Mask(True, (4, -1))
    for r in range(p):
        lay = SeqLayout.simulated(n, p, r, "contiguous")
        seen = [k for k in range(p) if visible_blocks(lay, r, k, mask)]
        assert seen == [k for k in (r - 1, r) if k >= 0]


WINDOW_CASES = [
    # (world, seq_len, window, causal, scheme, documents)
    (4, 16, (0, 0), False, "zigzag", None),  # a row whose window sees only itself
    (4, 16, (0, 0), True, "stripe", None),
    (3, 18, (9, -1), True, "contiguous", None),  # a window crossing several ranks
    (4, 20, (2, 3), False, "balanced", (0, 7, 8, 20)),  # with documents
    (2, 11, (-1, 2), False, "zigzag", None),  # only a right edge
    (3, 13, (4, 4), True, "stripe", (0, 1, 2, 13)),
]


@pytest.mark.parametrize("strategy", ["ring", "ulysses", "usp", "allgather", "token_ring"])
@pytest.mark.parametrize("p, n, window, causal, scheme, docs", WINDOW_CASES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_every_strategy_serves_windows(strategy, p, n, window, causal, scheme, docs, dtype):
    problem = AttentionProblem(p, n, heads=12, kv_heads=p, causal=causal, scheme=scheme, documents=docs,
                               window=window, dtype=dtype, seed=n)
    assert_matches_dense(problem, world(p).run(check_attention, problem, None, strategy=strategy)[0])


def _bad_window(window):
    layout = SeqLayout(8)
    q = torch.randn(1, layout.local_len, 2, 4)
    try:
        seqpar.attention(q, q, q, layout=layout, window_size=window)
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "returned"


@pytest.mark.parametrize("window, match", [
    ((-2, 3), "ValueError: window_size: expected ints >= -1 .-1: unbounded on that side., got .-2, 3."),
    ((1, 2, 3), "TypeError: window_size: expected a pair of ints .left, right., got"),
    ("3", "TypeError: window_size: expected a pair of ints"),
    ((1.0, 2), "TypeError: window_size: expected a pair of ints"),
])
def test_bad_window_raises_on_every_rank(window, match):
    import re

    for message in world(2).run(_bad_window, window, timeout=120):
        assert re.search(match, message), message


def _window_differs_by_rank():
    layout = SeqLayout(8)
    q = torch.randn(1, layout.local_len, 2, 4)
    try:
        seqpar.attention(q, q, q, layout=layout, causal=True, window_size=(2, -1) if dist.get_rank() else (3, -1))
    except ValueError as exc:
        return str(exc)
    return "returned"


def test_a_window_that_differs_between_ranks_raises_everywhere():
    for message in world(2).run(_window_differs_by_rank, timeout=120):
        assert "window_size must be the same on every rank" in message, message


def test_visibility_of_windows_and_documents():
    mask = visibility(6, True, (0, 2, 6), (1, -1))
    want = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                         [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, want)
