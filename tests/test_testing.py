"""The test world and the checker must be able to fail."""
import time

import pytest
import torch

import seqpar
from seqpar.testing import AttentionProblem, LocalWorld, RankError, WorldTimeout, check_attention, tolerance_violations, world


def _sleep(seconds):
    time.sleep(seconds)


def _fail_on_rank_one():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise KeyError("boom")
    return dist.get_rank()


def test_world_reports_failures_and_results():
    assert world(2).run(_fail_on_rank_one, return_exceptions=True)[0] == 0
    with pytest.raises(RankError, match="rank 1: KeyError: 'boom'"):
        world(2).run(_fail_on_rank_one)


def test_a_hang_is_a_timeout_not_a_wait():
    w = LocalWorld(1)
    start = time.monotonic()
    with pytest.raises(WorldTimeout):
        w.run(_sleep, 30, timeout=1)
    assert time.monotonic() - start < 20
    assert not w.alive


def _die_on_rank_one():
    import os

    import torch.distributed as dist

    if dist.get_rank() == 1:
        os._exit(3)
    return "rank 0 is fine"


def test_a_dead_rank_is_reported_and_the_world_replaced():
    from seqpar.testing import WorldDied

    doomed = world(2)
    with pytest.raises(WorldDied, match="exit codes by rank"):
        doomed.run(_die_on_rank_one, timeout=60)
    assert not doomed.alive
    assert world(2) is not doomed and world(2).run(_fail_on_rank_one, return_exceptions=True)[0] == 0


def wrong_attention(q, k, v, *, layout, causal, softmax_scale):
    """Ring attention that forgets the causal mask: the checker must catch it."""
    return seqpar.ring_attention(q, k, v, layout=layout, causal=False, softmax_scale=softmax_scale)


def slightly_wrong_attention(q, k, v, *, layout, causal, softmax_scale):
    """An error of about 1e-5 relative: fine for bf16, far off for float64."""
    out = seqpar.ring_attention(q, k, v, layout=layout, causal=causal, softmax_scale=softmax_scale)
    return out * (1 + 1e-5)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_checker_catches_a_wrong_mask(dtype):
    problem = AttentionProblem(2, 16, causal=True, scheme="zigzag", dtype=dtype)
    report = world(2).run(check_attention, problem, wrong_attention)[0]
    assert set(tolerance_violations(problem, report)) >= {"out", "dq"}


def test_checker_is_tight_in_float64():
    problem = AttentionProblem(2, 16, causal=True, dtype="float64")
    assert "out" in tolerance_violations(problem, world(2).run(check_attention, problem, slightly_wrong_attention)[0])
    assert not tolerance_violations(problem, world(2).run(check_attention, problem)[0])


def gradient_noise_attention(q, k, v, *, layout, causal, softmax_scale):
    """Ring attention whose q-gradient is off by 1024 fp32 ulps of its largest value: within
    the floor of a cancelled gradient, far over it on a healthy one (where dense fp32's own
    error is a few ulps on any machine)."""

    class Noise(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return grad + 1024 * torch.finfo(torch.float32).eps * grad.abs().max() * torch.sign(grad)

    return seqpar.ring_attention(Noise.apply(q), k, v, layout=layout, causal=causal, softmax_scale=softmax_scale)


def test_cancelled_gradients_are_judged_against_the_terms_they_sum():
    """Two tokens, logits ~16/sqrt(D): the softmax saturates and dq cancels far below its
    terms (cond in the thousands and up); before the conditioning entered the floor, such
    fp32 problems broke the rule on rounding noise (7 of 800 drawn). The premises that do not
    depend on the machine are asserted on real runs (these problems are cancelled, and pass);
    that the conditioning decides the verdict is shown on reports built by hand, since how
    far a given BLAS lands from float64 dense on one problem is not a property of seqpar."""
    problem = AttentionProblem(2, 2, causal=True, scheme="zigzag", dtype="float32", logit_scale=16.0, seed=11)
    report = world(2).run(check_attention, problem, None, strategy="ring")[0]
    assert report["cond_dq"] > 1e3 and 1.0 <= report["cond_out"] < 16
    assert not tolerance_violations(problem, report)
    # float64: two tokens, a dq cancelled 1e6-fold and more below its terms
    f64 = AttentionProblem(2, 2, batch=2, heads=1, kv_heads=1, head_dim=16, scheme="stripe", dtype="float64",
                           logit_scale=16.0, seed=1)
    report = world(2).run(check_attention, f64, seqpar.ring_attention)[0]
    assert report["cond_dq"] > 1e6 and not tolerance_violations(f64, report)
    # the rule itself, dense exact: 256 fp32 ulps at cond 1e3, 4 float64 ulps x cond at cond 1e7
    eps32, eps64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
    for prob, err, cond in ((problem, 256 * eps32, 1e3), (f64, 4 * eps64 * 1e7, 1e7)):
        judged = {"err_dq": err, "dense_dq": 0.0, "cond_dq": cond}
        assert not tolerance_violations(prob, judged)
        assert "dq" in tolerance_violations(prob, {"err_dq": err, "dense_dq": 0.0})  # judged against the result
    # the widened floor follows the conditioning: the same kind of error on a healthy problem fails
    healthy = AttentionProblem(2, 16, causal=True, scheme="zigzag", dtype="float32")
    report = world(2).run(check_attention, healthy, gradient_noise_attention)[0]
    assert report["cond_dq"] < 16 and "dq" in tolerance_violations(healthy, report)
