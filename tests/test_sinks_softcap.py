"""Attention sinks (gpt-oss) and logit softcap (Gemma 2) on every strategy, with windows
and documents, against float64 dense attention; their bad input."""
import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.layout import SeqLayout
from seqpar.testing import AttentionProblem, assert_matches_dense, check_attention, world

CASES = [
    # (world, seq_len, scheme, causal, window, documents, softcap, sinks)
    (2, 13, "zigzag", True, (-1, -1), None, 0.0, True),
    (4, 17, "stripe", True, (5, -1), None, 0.0, True),
    (3, 16, "balanced", True, (-1, -1), (0, 4, 5, 16), 0.0, True),
    (2, 12, "contiguous", False, (2, 2), None, 0.0, True),
    (4, 18, "zigzag", True, (6, -1), None, 30.0, False),  # Gemma 2: softcap and a window
    (3, 15, "balanced", True, (-1, -1), (0, 9, 15), 5.0, True),  # all at once
]


@pytest.mark.parametrize("strategy", ["ring", "ulysses", "usp", "allgather", "token_ring"])
@pytest.mark.parametrize("p, n, scheme, causal, window, docs, softcap, sinks", CASES)
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_every_strategy_serves_sinks_and_softcap(strategy, p, n, scheme, causal, window, docs, softcap, sinks, dtype):
    problem = AttentionProblem(p, n, heads=12, kv_heads=p, causal=causal, scheme=scheme, window=window,
                               documents=docs, softcap=softcap, sinks=sinks, dtype=dtype, seed=n)
    report = world(p).run(check_attention, problem, None, strategy=strategy)[0]
    assert ("err_dsinks" in report) == sinks
    assert_matches_dense(problem, report)


def _bad(case):
    layout = SeqLayout(8)
    q = torch.randn(1, layout.local_len, 4, 8)
    kwargs = {
        "sinks_shape": dict(sinks=torch.zeros(3)),
        "sinks_dtype": dict(sinks=torch.zeros(4, dtype=torch.int64)),
        "sinks_type": dict(sinks=[0.0] * 4),
        "softcap_negative": dict(softcap=-1.0),
        "sinks_differ": dict(sinks=torch.full((4,), float(dist.get_rank()))),
        "softcap_differ": dict(softcap=1.0 + dist.get_rank()),
        "softcap_on_sdpa": dict(softcap=2.0, backend="sdpa"),
    }[case]
    try:
        seqpar.attention(q, q, q, layout=layout, causal=True, strategy="ring", **kwargs)
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "returned"


@pytest.mark.parametrize("case, match", [
    ("sinks_shape", r"sinks: expected shape \[4\] \(one logit per query head\), got \(3,\)"),
    ("sinks_dtype", "sinks: expected a floating-point tensor, got torch.int64"),
    ("sinks_type", r"TypeError: sinks: expected None or a torch.Tensor \[4\], got list"),
    ("softcap_negative", r"softcap: expected a finite float >= 0 \(0: none\), got -1.0"),
    ("sinks_differ", r"sinks \(its values\) must be the same on every rank"),
    ("softcap_differ", "softcap must be the same on every rank"),
    ("softcap_on_sdpa", r"backend: sdpa has no softcap, got softcap=2.0 \(backend='torch' or 'triton' serves it\)"),
])
def test_bad_sinks_and_softcap_raise_on_every_rank(case, match):
    import re

    for message in world(2).run(_bad, case, timeout=120):
        assert re.search(match, message) or "got bad input" in message, message
    assert any(re.search(match, m) for m in world(2).run(_bad, case, timeout=120))


@pytest.mark.parametrize("strategy", ["ring", "ulysses", "token_ring"])
@pytest.mark.parametrize("window, dtype", [((-1, -1), "float32"), ((5, -1), "float32"), ((4, 2), "float16")])
def test_triton_backend_serves_softcap(strategy, window, dtype):
    """The Triton kernels cap the scores themselves (CPU: under the interpreter), windows
    included (one-sided pieces of the band, each capped)."""
    from seqpar.kernels import block

    reason = block.unavailable_reason("triton", torch.device("cpu"), torch.float32, 8)
    if reason:
        pytest.skip(reason)
    problem = AttentionProblem(2, 14, heads=4, kv_heads=2, causal=True, scheme="zigzag", window=window, softcap=5.0,
                               logit_scale=4.0, dtype=dtype, seed=5)
    report = world(2).run(check_attention, problem, None, strategy=strategy, backend="triton")[0]
    assert_matches_dense(problem, report)
