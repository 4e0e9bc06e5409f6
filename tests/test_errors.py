"""Bad input raises a clear error on every rank; nothing leaves a rank waiting."""
import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.layout import SeqLayout
from seqpar.testing import world


def _qkv(n=6, b=1, h=4, h_kv=2, d=8, dtype=torch.float32):
    return torch.randn(b, n, h, d, dtype=dtype), torch.randn(b, n, h_kv, d, dtype=dtype), torch.randn(b, n, h_kv, d, dtype=dtype)


q, k, v = _qkv()
LOCAL_CASES = [
    ("q_not_tensor", dict(q=q.tolist()), TypeError, "q: expected a torch.Tensor"),
    ("q_3d", dict(q=q[0]), ValueError, r"q: expected 4 dims \[batch, seqlen, heads, head_dim\], got shape \(6, 4, 8\)"),
    ("k_dtype", dict(k=k.double()), ValueError, "k: expected dtype torch.float32 .that of q., got torch.float64"),
    ("int_dtype", dict(q=q.int(), k=k.int(), v=v.int()), ValueError, "q: expected dtype in"),
    ("heads_not_divisible", dict(k=torch.randn(1, 6, 3, 8), v=torch.randn(1, 6, 3, 8)), ValueError,
     "k: expected a number of KV heads that divides q's 4 heads, got 3"),
    ("v_shape", dict(v=torch.randn(1, 6, 3, 4)), ValueError, r"v: expected the shape of k \(1, 6, 2, 8\) up to its head dim"),
    ("head_dim", dict(k=torch.randn(1, 6, 2, 4), v=torch.randn(1, 6, 2, 4)), ValueError, "k: expected head_dim 8"),
    ("batch", dict(k=torch.randn(2, 6, 2, 8), v=torch.randn(2, 6, 2, 8)), ValueError, "k: expected batch 1"),
    ("kv_len", dict(k=torch.randn(1, 5, 2, 8), v=torch.randn(1, 5, 2, 8)), ValueError, "k: expected local seqlen 6"),
    ("local_len", dict(layout=SeqLayout(7)), ValueError, "q: expected local seqlen 7 .layout.local_len on rank 0., got 6"),
    ("layout_type", dict(layout="zigzag"), TypeError, "layout: expected a seqpar.SeqLayout"),
    ("layout_world", dict(layout=SeqLayout.simulated(12, 2)), ValueError, "layout: expected a layout of this process group"),
    ("strategy", dict(strategy="ringg"), ValueError, "strategy: expected one of"),
    ("backend", dict(backend="cudnn"), ValueError, "backend: expected one of"),
    ("backend_unavailable", dict(backend="flash_attn"), ValueError, "backend: flash_attn"),
    ("causal_type", dict(causal="yes"), TypeError, "causal: expected a bool"),
    ("scale_nan", dict(softmax_scale=float("nan")), ValueError, "softmax_scale: expected a finite float"),
    ("scale_str", dict(softmax_scale="0.5"), TypeError, "softmax_scale: expected a float or None, got str"),
    ("sdpa_scale_zero", dict(softmax_scale=0.0, backend="sdpa"), ValueError, "backend: sdpa needs softmax_scale > 0"),
    # k wrong, v right: k is blamed (before, "v: expected the shape of k")
    ("k_head_dim_only", dict(k=torch.randn(1, 6, 2, 4)), ValueError, r"^k: expected head_dim 8 .that of q., got 4$"),
    ("k_len_only", dict(k=torch.randn(1, 5, 2, 8)), ValueError, r"^k: expected local seqlen 6 .that of q., got 5$"),
    ("all_at_once", dict(k=torch.randn(2, 5, 3, 4)), ValueError,
     r"k: expected batch 1 .*; k: expected local seqlen 6 .*; k: expected head_dim 8 .*; k: expected a number of KV"),
    ("dtype_and_device_at_once", dict(k=k.double(), v=v.half()), ValueError,
     r"k: expected dtype torch.float32 .that of q., got torch.float64; v: expected dtype torch.float32"),
    ("meta", dict(q=q.to("meta"), k=k.to("meta"), v=v.to("meta")), ValueError,
     r"q: expected a tensor with data \(on cpu, cuda, ...\), got one on the meta device"),
    ("unknown_option", dict(ulysses_size=2), ValueError, r"options: strategy 'ring' takes no options, got \['ulysses_size'\]"),
]


@pytest.mark.parametrize("name, change, err, match", LOCAL_CASES, ids=[c[0] for c in LOCAL_CASES])
def test_bad_input_single_process(name, change, err, match):
    args = dict(q=q, k=k, v=v)
    args.update({key: change[key] for key in ("q", "k", "v") if key in change})
    kwargs = {key: val for key, val in change.items() if key not in ("q", "k", "v")}
    with pytest.raises(err, match=match):
        seqpar.attention(args["q"], args["k"], args["v"], **kwargs)


def _bad_on_one_rank(case: str, bad_rank: int):
    """Every rank calls ring attention; only `bad_rank` gets the bad argument."""
    rank = dist.get_rank()
    n = 8 + len(case)  # a fresh call signature for each case
    layout = SeqLayout(n * dist.get_world_size(), scheme="zigzag")
    local = layout.local_len
    qq, kk, vv = _qkv(local)
    kwargs = dict(layout=layout, causal=True)
    if rank == bad_rank:
        if case == "dtype":
            qq, kk, vv = qq.double(), kk.double(), vv.double()
        elif case == "head_dim":
            qq, kk, vv = _qkv(local, d=16)
        elif case == "heads":
            qq = torch.randn(1, local, 2, 8)
        elif case == "local_error":
            kk, vv = kk[:, :-1], vv[:, :-1]
        elif case == "causal":
            kwargs["causal"] = False
        elif case == "scale":
            kwargs["softmax_scale"] = 0.5
        elif case == "backend":
            kwargs["backend"] = "torch"
        elif case == "batch":
            qq, kk, vv = _qkv(local, b=2)
    seqpar.ring_attention(qq, kk, vv, **kwargs)
    return "returned"


MISMATCH_CASES = [
    ("dtype", "dtype"), ("head_dim", "q [batch, heads, head_dim]"), ("heads", "q [batch, heads, head_dim]"),
    ("local_error", "k: expected local seqlen"), ("causal", "causal must be the same on every rank"),
    ("scale", "softmax_scale must be the same"), ("backend", "backend must be the same"), ("batch", "q [batch"),
]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("case, match", MISMATCH_CASES, ids=[c[0] for c in MISMATCH_CASES])
def test_mismatch_between_ranks_raises_everywhere(world_size, case, match):
    bad_rank = world_size - 1
    results = world(world_size).run(_bad_on_one_rank, case, bad_rank, return_exceptions=True, timeout=60)
    for rank, outcome in enumerate(results):
        assert isinstance(outcome, ValueError), f"rank {rank} returned {outcome!r}"
        assert match in str(outcome), f"rank {rank}: {outcome}"
    if case == "local_error":
        assert "rank %d of the group got bad input" % bad_rank in str(results[0])


def _good_call_after_errors():
    layout = SeqLayout(12, scheme="stripe")
    qq, kk, vv = _qkv(layout.local_len)
    return seqpar.ring_attention(qq, kk, vv, layout=layout, causal=True).shape


def test_world_still_works_after_errors():
    test_mismatch_between_ranks_raises_everywhere(2, "dtype", "dtype")
    assert world(2).run(_good_call_after_errors) == [torch.Size([1, 6, 4, 8])] * 2


def _first_mode_skips_the_check():
    from seqpar.comm import set_validation, track

    set_validation("first")
    try:
        layout = SeqLayout(10, scheme="contiguous")
        qq, kk, vv = _qkv(layout.local_len)
        seqpar.ring_attention(qq, kk, vv, layout=layout)  # agreed once
        with track() as stats:
            seqpar.ring_attention(qq, kk, vv, layout=layout)
        return stats.calls("check")
    finally:
        set_validation("always")


def test_first_mode_skips_agreed_signatures():
    assert world(2).run(_first_mode_skips_the_check) == [0, 0]


def _cached_then_changed():
    """Both ranks agree on a call; then one rank alone changes dtype (found by review)."""
    layout = SeqLayout(22, scheme="contiguous")
    qq, kk, vv = _qkv(layout.local_len, d=5)
    seqpar.ring_attention(qq, kk, vv, layout=layout)
    if dist.get_rank() == 1:
        qq, kk, vv = qq.double(), kk.double(), vv.double()
    seqpar.ring_attention(qq, kk, vv, layout=layout)


def _two_agreed_signatures_then_mixed():
    layout = SeqLayout(26, scheme="contiguous")
    for d in (6, 10):
        seqpar.ring_attention(*_qkv(layout.local_len, d=d), layout=layout)
    seqpar.ring_attention(*_qkv(layout.local_len, d=6 if dist.get_rank() == 0 else 10), layout=layout)


@pytest.mark.parametrize("fn", [_cached_then_changed, _two_agreed_signatures_then_mixed])
def test_a_change_after_agreement_still_raises_everywhere(fn):
    results = world(2).run(fn, return_exceptions=True, timeout=60)
    assert all(isinstance(r, ValueError) and "must be the same on every rank" in str(r) for r in results), results


def test_set_validation_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode: expected one of"):
        seqpar.comm.set_validation("never")


def test_fused_backends_refuse_nonpositive_scale_and_auto_routes_to_torch():
    qq, kk, vv = (t.double() for t in _qkv(5))
    for scale in (0.0, -0.7):
        out = seqpar.attention(qq, kk, vv, causal=True, softmax_scale=scale)
        from seqpar.kernels.reference import dense_attention

        torch.testing.assert_close(out, dense_attention(qq, kk, vv, causal=True, softmax_scale=scale))


def _grad_on_rank_zero_only(entry):
    """Call `entry` with inputs that require grad on rank 0 only; the error message or None."""
    import seqpar as sp

    layout = sp.SeqLayout(8)
    x = torch.randn(1, layout.local_len, 2, 4, requires_grad=layout.rank == 0)
    k = v = x.detach()
    calls = {
        "attention": lambda: sp.attention(x, k, v, layout=layout, strategy="ring"),
        "linear_attention": lambda: sp.linear_attention(x, k, v, layout=layout),
        "star_attention": lambda: sp.star_attention(x, k, v, layout=layout, anchor_len=1),
        "star_query_attention": lambda: sp.star_query_attention(
            torch.randn(1, 2, 2, 4, generator=torch.Generator().manual_seed(0), requires_grad=layout.rank == 0), k, v),
    }
    try:
        calls[entry]()
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("entry", ["attention", "linear_attention", "star_attention", "star_query_attention"])
def test_gradients_wanted_on_some_ranks_only_raises_everywhere(entry):
    # otherwise the backward's collectives would run on rank 0 alone and wait forever
    for message in world(2).run(_grad_on_rank_zero_only, entry, timeout=60):
        assert message is not None and "gradients required" in message


def _usp_with_local_world_size(values):
    """USP without `ulysses_size`: its default reads LOCAL_WORLD_SIZE, here different per rank."""
    import os

    rank = dist.get_rank()
    old = os.environ.get("LOCAL_WORLD_SIZE")
    os.environ["LOCAL_WORLD_SIZE"] = str(values[rank])
    try:
        layout = SeqLayout(16, scheme="zigzag")
        seqpar.usp_attention(*_qkv(layout.local_len), layout=layout, causal=True)
        return "returned"
    except ValueError as exc:
        return str(exc)
    finally:
        if old is None:
            os.environ.pop("LOCAL_WORLD_SIZE")
        else:
            os.environ["LOCAL_WORLD_SIZE"] = old


def test_usp_default_from_the_environment_is_agreed():
    # before, rank 0 ran ring (U=1) and rank 1 Ulysses (U=2): different collectives, a hang
    results = world(2).run(_usp_with_local_world_size, (1, 2), timeout=60)
    for message in results:
        assert "options with defaults resolved on this rank must be the same on every rank" in message, results
        assert "'ulysses_size', ('int', 1)" in message and "'ulysses_size', ('int', 2)" in message
    assert world(2).run(_usp_with_local_world_size, (2, 2), timeout=60) == ["returned"] * 2


def _star_query_with_rank_dependent_q(change: str):
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 3, 4, 8, generator=gen)
    k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    if rank == 1 and change == "value":
        q[0, 2, 1, 7] += 1e-3
    elif rank == 1 and change == "order":
        q = q.flip(1)  # the same values, rows swapped: a sum alone would not see it
    try:
        seqpar.star_query_attention(q, k, v)
        return "returned"
    except ValueError as exc:
        return str(exc)


@pytest.mark.parametrize("change", ["value", "order"])
def test_star_query_q_that_differs_between_ranks_raises_everywhere(change):
    # before, every rank returned the same wrong answer (relative error 0.4-1.2)
    for message in world(2).run(_star_query_with_rank_dependent_q, change, timeout=60):
        assert "q (its values) must be the same on every rank" in message, message
    assert world(2).run(_star_query_with_rank_dependent_q, "none", timeout=60) == ["returned"] * 2


def _star_with_backend_available_on_rank_zero_only(phase: str):
    """`backend="auto"` resolves by what is installed; here rank 1 lacks the fused op."""
    from seqpar.kernels import backends

    if dist.get_rank() == 1:
        original = backends.unavailable_reason
        backends.unavailable_reason = lambda name, *args, **kw: "not here" if name == "sdpa" else original(
            name, *args, **kw)
    try:
        layout = SeqLayout(12)
        q, k, v = _qkv(layout.local_len)
        if phase == "context":
            seqpar.star_attention(q, k, v, layout=layout, anchor_len=2)
        else:
            seqpar.star_query_attention(q[:, :2].clone().fill_(0.5), k, v)
        return "returned"
    except ValueError as exc:
        return str(exc)
    finally:
        if dist.get_rank() == 1:
            backends.unavailable_reason = original


@pytest.mark.parametrize("phase", ["context", "query"])
def test_star_backend_resolved_differently_raises_everywhere(phase):
    for message in world(2).run(_star_with_backend_available_on_rank_zero_only, phase, timeout=120):
        assert "backend resolved on this rank must be the same on every rank" in message, message
