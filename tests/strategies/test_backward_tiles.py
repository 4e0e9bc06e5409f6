"""The backward's CPU tiles (`strategies.common.BACKWARD_TILE`): blocks cut into sub-blocks
of at most that many rows and keys give the same gradients, for every mask and strategy.
The suite's problems are far below the default tile (1024), so a rank here sets it to 3."""
import pytest

from seqpar.layout import Block
from seqpar.strategies import common
from seqpar.testing import AttentionProblem, assert_matches_dense, check_attention, world


def _with_tiny_tiles(problem, strategy):
    default, common.BACKWARD_TILE = common.BACKWARD_TILE, 3
    try:
        return check_attention(problem, None, strategy=strategy)
    finally:
        common.BACKWARD_TILE = default


@pytest.mark.parametrize("strategy", ["ring", "allgather", "token_ring", "usp"])
@pytest.mark.parametrize("mask", ["causal", "window_softcap", "documents"])
def test_tiled_backward_matches_dense(strategy, mask):
    options = {"causal": dict(causal=True),
               "window_softcap": dict(causal=True, window=(5, 0), softcap=2.0),
               "documents": dict(causal=True, documents=(0, 3, 4, 17, 29))}[mask]
    problem = AttentionProblem(4, 29, heads=4, kv_heads=2, scheme="zigzag", sinks=True, **options)
    report = world(4).run(_with_tiny_tiles, problem, strategy)[0]
    assert_matches_dense(problem, report)
    assert report["err_dq"] < 1e-12 and report["err_dk"] < 1e-12


def test_tiles_cover_each_visible_pair_once():
    import itertools

    def visible(i, j, offset, lo):
        return (offset is None or j - i <= offset) and (lo is None or j - i >= lo)

    bounds = [None] + list(range(-9, 10))
    for rows, keys, offset, lo, tile in itertools.product((1, 4, 7), (1, 5, 8), bounds, bounds, (1, 2, 3)):
        if offset is not None and lo is not None and lo > offset:
            continue
        blk = Block(3, rows, 5, keys, offset, lo, softcap=1.5)
        want = {(3 + i, 5 + j) for i in range(rows) for j in range(keys) if visible(i, j, offset, lo)}
        got = []
        for t in common.backward_tiles(blk, tile):
            assert t.q_len <= tile and t.k_len <= tile and t.softcap == 1.5
            got += [(t.q_start + i, t.k_start + j) for i in range(t.q_len) for j in range(t.k_len)
                    if visible(i, j, t.offset, t.lo)]
        assert sorted(got) == sorted(want), blk
