import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from seqpar.kernels.merge import merge, merge_
from seqpar.kernels.reference import dense_attention


def _parts(nk_parts, seed, scale=1.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 5, 3, 8, generator=gen, dtype=dtype)
    ks = [torch.randn(2, n, 3, 8, generator=gen, dtype=dtype) for n in nk_parts]
    vs = [torch.randn(2, n, 3, 8, generator=gen, dtype=dtype) for n in nk_parts]
    parts = [dense_attention(q, k, v, softmax_scale=scale, return_lse=True) for k, v in zip(ks, vs)]
    whole = dense_attention(q, torch.cat(ks, 1), torch.cat(vs, 1), softmax_scale=scale, return_lse=True)
    return parts, whole


@given(st.lists(st.integers(1, 6), min_size=1, max_size=5), st.integers(0, 1000), st.sampled_from([0.1, 1.0, 30.0]))
def test_merge_equals_attention_over_the_union(sizes, seed, scale):
    parts, (out, lse) = _parts(sizes, seed, scale)
    got_out, got_lse = merge(parts)
    torch.testing.assert_close(got_out, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_lse, lse, rtol=1e-12, atol=1e-12)


def test_merge_is_order_invariant():
    parts, _ = _parts([3, 1, 4, 2], seed=7, scale=5.0)
    results = [merge(list(p)) for p in itertools.permutations(parts)]
    for out, lse in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, results[0][1], rtol=1e-12, atol=1e-12)


def test_rows_that_saw_no_key_stay_finite_and_do_not_disturb_others():
    out = torch.zeros(1, 2, 1, 4)
    lse = torch.full((1, 1, 2), float("-inf"))
    empty_out, empty_lse = torch.zeros(1, 2, 1, 4), torch.full((1, 1, 2), float("-inf"))
    merge_(out, lse, empty_out, empty_lse)  # -inf with -inf
    assert torch.isfinite(out).all() and torch.isneginf(lse).all()
    part_out = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]], [[0.0, 0.0, 0.0, 0.0]]]])
    part_lse = torch.tensor([[[0.5, float("-inf")]]])
    merge_(out, lse, part_out, part_lse)
    torch.testing.assert_close(out, part_out)
    torch.testing.assert_close(lse, part_lse)
    merge_(out, lse, empty_out, empty_lse)  # a later empty part changes nothing
    torch.testing.assert_close(out, part_out)
    torch.testing.assert_close(lse, part_lse)


@pytest.mark.parametrize("big", [80.0, 1e4, 3e38])
def test_merge_does_not_overflow_on_huge_lse(big):
    # log(1 + exp(x)) overflows for x > 88 in fp32; the stable form must not
    out1, out2 = torch.ones(1, 1, 1, 2), 3 * torch.ones(1, 1, 1, 2)
    l1, l2 = torch.tensor([[[big]]]), torch.tensor([[[big]]])
    out, lse = merge([(out1, l1), (out2, l2)])
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out, 2 * torch.ones(1, 1, 1, 2))
    torch.testing.assert_close(lse, torch.tensor([[[big]]]) + torch.log(torch.tensor(2.0)))


def test_merge_accumulates_low_precision_parts_in_fp32():
    parts, (ref_out, _) = _parts([4, 4], seed=3, dtype=torch.float64)
    low = [(o.to(torch.bfloat16), l.float()) for o, l in parts]
    out, lse = merge(low)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert (out.double() - ref_out).abs().max() < 2e-2


def test_merge_rejects_empty_input():
    with pytest.raises(ValueError, match="parts"):
        merge([])
