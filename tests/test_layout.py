import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import seqpar
from seqpar.layout import SCHEMES, GroupLayout, SeqLayout, split_sizes, visible_blocks
from seqpar.testing import world


def layouts_of(seq_len, world_size, scheme):
    return [SeqLayout.simulated(seq_len, world_size, r, scheme) for r in range(world_size)]


@st.composite
def layout_cases(draw):
    p = draw(st.integers(1, 8))
    return draw(st.integers(p, 6 * p)), p, draw(st.sampled_from(SCHEMES))


@given(layout_cases())
def test_positions_partition_the_sequence(case):
    n, p, scheme = case
    layouts = layouts_of(n, p, scheme)
    allpos = torch.cat([lay.positions() for lay in layouts])
    assert torch.equal(allpos.sort().values, torch.arange(n))
    for lay in layouts:
        pos = lay.positions()
        assert pos.dtype == torch.int64 and len(pos) == lay.local_len
        assert torch.all(pos[1:] > pos[:-1]), "local order must ascend"
        assert torch.equal(lay.shard(torch.arange(n), dim=0), pos)


@given(layout_cases())
def test_scheme_definitions(case):
    n, p, scheme = case
    for r, lay in enumerate(layouts_of(n, p, scheme)):
        pos = lay.positions().tolist()
        if scheme == "stripe":
            assert pos == list(range(r, n, p))
        elif scheme == "contiguous":
            assert pos == torch.tensor_split(torch.arange(n), p)[r].tolist()
        else:
            chunks = torch.tensor_split(torch.arange(n), 2 * p)
            assert pos == chunks[r].tolist() + chunks[2 * p - 1 - r].tolist()
    lens = [lay.local_len for lay in layouts_of(n, p, scheme)]
    assert max(lens) - min(lens) <= (2 if scheme == "zigzag" else 1)


def test_split_sizes_match_tensor_split():
    for n in range(0, 30):
        for parts in range(1, 9):
            assert split_sizes(n, parts) == [len(c) for c in torch.tensor_split(torch.arange(n), parts)]


@given(layout_cases(), st.booleans())
def test_visible_blocks_cover_exactly_the_visible_pairs(case, causal):
    n, p, scheme = case
    layouts = layouts_of(n, p, scheme)
    for qr in range(p):
        for kr in range(p):
            qpos, kpos = layouts[qr].positions(), layouts[kr].positions()
            covered = torch.zeros(len(qpos), len(kpos), dtype=torch.int64)
            for b in visible_blocks(layouts[0], qr, kr, causal):
                i = torch.arange(b.q_len)[:, None]
                j = torch.arange(b.k_len)[None, :]
                mask = torch.ones(b.q_len, b.k_len, dtype=torch.bool) if b.offset is None else j <= i + b.offset
                assert mask.any(), "a fully masked block must be skipped"
                covered[b.q_start:b.q_start + b.q_len, b.k_start:b.k_start + b.k_len] += mask.to(torch.int64)
            want = (kpos[None, :] <= qpos[:, None]) if causal else torch.ones(len(qpos), len(kpos), dtype=torch.bool)
            assert torch.equal(covered, want.to(torch.int64))


def _storage_positions(runs):
    return torch.cat([torch.arange(r.start, r.start + r.stride * r.length, r.stride) for r in runs])


@given(layout_cases(), st.booleans(), st.sampled_from([1, 2, 3, 4]))
def test_group_layout_blocks_cover_exactly_the_visible_pairs(case, causal, size):
    n, p, scheme = case
    assume(p % size == 0)
    base = SeqLayout.simulated(n, p, 0, scheme)
    groups = [list(range(g * size, (g + 1) * size)) for g in range(p // size)]
    grouped = GroupLayout(base, groups, 0)
    for g, members in enumerate(groups):
        stored = _storage_positions(grouped.runs(g))
        assert len(stored) == grouped.local_len_of(g)
        for member in members:
            assert torch.equal(stored[grouped.local_index(member)], base.positions_of(member))
    for qg in range(len(groups)):
        for kg in range(len(groups)):
            qpos, kpos = _storage_positions(grouped.runs(qg)), _storage_positions(grouped.runs(kg))
            covered = torch.zeros(len(qpos), len(kpos), dtype=torch.int64)
            for b in visible_blocks(grouped, qg, kg, causal):
                i = torch.arange(b.q_len)[:, None]
                j = torch.arange(b.k_len)[None, :]
                mask = torch.ones(b.q_len, b.k_len, dtype=torch.bool) if b.offset is None else j <= i + b.offset
                covered[b.q_start:b.q_start + b.q_len, b.k_start:b.k_start + b.k_len] += mask.to(torch.int64)
            want = (kpos[None, :] <= qpos[:, None]) if causal else torch.ones(len(qpos), len(kpos), dtype=torch.bool)
            assert torch.equal(covered, want.to(torch.int64))


def test_zigzag_steps_are_single_blocks():
    # ring-flash-attention's zigzag: each off-diagonal step is one unmasked kernel call
    layouts = layouts_of(64, 4, "zigzag")
    for qr in range(4):
        for kr in range(4):
            blocks = visible_blocks(layouts[0], qr, kr, causal=True)
            assert len(blocks) == 1
            assert (blocks[0].offset is None) == (qr != kr)


@pytest.mark.parametrize("bad, err, match", [
    (dict(seq_len=3, world_size=4), ValueError, "seq_len: expected at least the world size"),
    (dict(seq_len=8, world_size=2, scheme="ring"), ValueError, "scheme: expected one of"),
    (dict(seq_len=8, world_size=2, rank=2), ValueError, "rank: expected"),
])
def test_simulated_layout_errors(bad, err, match):
    with pytest.raises(err, match=match):
        SeqLayout.simulated(**bad)


def test_single_process_layout_and_errors():
    lay = SeqLayout(5, scheme="zigzag")
    assert (lay.world_size, lay.rank, lay.local_len) == (1, 0, 5)
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(lay.unshard(lay.shard(x)), x)
    with pytest.raises(TypeError, match="seq_len: expected an int"):
        SeqLayout(5.0)
    with pytest.raises(ValueError, match="scheme"):
        SeqLayout(5, scheme="Zigzag")
    with pytest.raises(ValueError, match="x: expected dim 1 of size seq_len=5"):
        lay.shard(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="x_local: expected dim 1 of size local_len=5"):
        lay.unshard(torch.randn(2, 4, 3))


def _shard_unshard(seq_len, scheme):
    lay = SeqLayout(seq_len, scheme=scheme)
    x = torch.arange(2 * seq_len * 3, dtype=torch.float64).reshape(2, seq_len, 3)
    local = lay.shard(x).clone().requires_grad_()
    full = lay.unshard(local)
    weight = torch.arange(full.numel(), dtype=torch.float64).reshape(full.shape)
    (full * weight).sum().backward()
    summed = local.detach().clone().requires_grad_()
    (lay.unshard(summed, reduce_grad=True) * weight).sum().backward()
    return torch.equal(full, x), torch.equal(local.grad, lay.shard(weight)), torch.equal(summed.grad, lay.world_size * lay.shard(weight))


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_unshard_rebuilds_and_differentiates(world_size, scheme):
    for seq_len in (world_size, 2 * world_size + 1, 17):
        for rank_result in world(world_size).run(_shard_unshard, seq_len, scheme):
            assert rank_result == (True, True, True)


def _layout_with(seq_len_by_rank, scheme_by_rank):
    import torch.distributed as dist

    r = dist.get_rank()
    SeqLayout(seq_len_by_rank[r], scheme=scheme_by_rank[r])


@pytest.mark.parametrize("seq_lens, schemes, match", [
    ((10, 12), ("zigzag", "zigzag"), "seq_len must be the same on every rank"),
    ((11, 11), ("zigzag", "stripe"), "scheme must be the same on every rank"),
    ((13, 13), ("zigzag", "zigzg"), "scheme: expected one of"),
    ((1, 1), ("stripe", "stripe"), "seq_len: expected at least the world size"),
])
def test_layout_mismatch_raises_on_every_rank(seq_lens, schemes, match):
    results = world(2).run(_layout_with, seq_lens, schemes, return_exceptions=True, timeout=60)
    for exc in results:
        assert isinstance(exc, ValueError), exc
    assert any(match in str(exc) for exc in results)


def test_public_names():
    for name in ("SeqLayout", "attention", "ring_attention"):
        assert name in seqpar.__all__ and hasattr(seqpar, name)
