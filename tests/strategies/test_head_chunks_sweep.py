"""A seeded sweep of Ulysses / USP with pipelined head chunks against float64 dense
attention: world sizes 2-4, GQA and replicated KV heads, the valid chunk counts, every
scheme (packed documents too), uneven lengths, long stripes (the index_copy path),
sinks, windows, softcaps, value head dims, memory layouts, float64 and bfloat16.
One world.run per world size runs its whole batch of cases."""
import os
import random

import pytest
import torch

from seqpar.testing import AttentionProblem, check_attention, tolerance_violations, world
from seqpar.testing.checks import MEMORY_LAYOUTS


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _documents(rng, n):
    cuts = sorted(rng.sample(range(1, n), k=min(n - 1, rng.randint(1, 3))))
    return tuple([0] + cuts + [n])


def _cases(p, count, seed):
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        strategy, u = ("usp", 2) if p == 4 and rng.random() < 0.35 else ("ulysses", p)
        replicated = rng.random() < 0.15 and u > 1
        if replicated:
            kv = rng.choice([d for d in _divisors(u) if d < u])
            heads = u * rng.choice([1, 2])
        else:
            kv = u * rng.choice([1, 2, 4])
            heads = kv * rng.choice([1, 2])
        per = 1 if kv % u else kv // u
        # mostly a pipelined count (c = 1 is the unchunked path the other tests cover)
        chunks = rng.choice(_divisors(per)[1:]) if per > 1 and rng.random() < 0.85 else 1
        scheme = rng.choice(["contiguous", "zigzag", "stripe", "balanced"])
        long_stripe = scheme == "stripe" and rng.random() < 0.3
        n = rng.randint(17 * p, 17 * p + 7) if long_stripe else rng.randint(p, 6 * p + 5)
        fields = dict(world_size=p, seq_len=n, heads=heads, kv_heads=kv, scheme=scheme,
                      batch=rng.choice([1, 2]), causal=rng.random() < 0.7,
                      dtype="bfloat16" if rng.random() < 0.3 else "float64",
                      head_dim=rng.choice([8, 12]), seed=rng.randrange(10 ** 6),
                      memory_layout=rng.choice(MEMORY_LAYOUTS))
        if scheme == "balanced" and n > 2 and rng.random() < 0.7:
            fields["documents"] = _documents(rng, n)
        if rng.random() < 0.3:
            fields["sinks"] = True
        if rng.random() < 0.25:
            fields["window"] = (rng.randint(0, 6), rng.choice([-1, -1, rng.randint(0, 4)]))
        if rng.random() < 0.2:
            fields["softcap"] = 5.0
        if rng.random() < 0.3:
            fields["value_dim"] = rng.choice([4, 16])
        options = {"head_chunks": chunks}
        if strategy == "usp":
            options["ulysses_size"] = u
        out.append((AttentionProblem(**fields), strategy, options))
    return out


def _run_cases(cases):
    reports = []
    for problem, strategy, options in cases:
        reports.append(check_attention(problem, None, strategy=strategy, **options))
    return reports


@pytest.mark.parametrize("p, count", [(2, 60), (3, 40), (4, 70)])
def test_head_chunks_sweep(p, count):
    # SWEEP_SEED=... draws another sweep of the same size
    cases = _cases(p, count, seed=int(os.environ.get("SWEEP_SEED", 1000)) + p)
    reports = world(p).run(_run_cases, cases, timeout=600)[0]
    bad = []
    for (problem, strategy, options), report in zip(cases, reports):
        violations = tolerance_violations(problem, report)
        if violations:
            bad.append(f"{strategy} {options} {problem}: {violations}")
    assert not bad, "\n".join(bad)


def _exact_chunks(problem, strategy, options):
    """float64 outputs and gradients of one rank with the options given."""
    import seqpar
    from seqpar.testing.checks import lay_out, lay_out_grad, leaf_grads

    layout = problem.layout()
    q, k, v, do = problem.global_tensors()
    leaves, views = lay_out([layout.shard(t) for t in (q, k, v)], problem.memory_layout)
    sinks = problem.global_sinks()
    extra = {} if sinks is None else {"sinks": sinks.clone().requires_grad_()}
    out = seqpar.attention(*views, layout=layout, causal=problem.causal, softmax_scale=problem.softmax_scale,
                           strategy=strategy, **problem.mask_options(), **extra, **options)
    out.backward(lay_out_grad(layout.shard(do), problem.memory_layout))
    result = [out.detach(), *leaf_grads(leaves, problem.memory_layout, problem.batch)]
    return result + ([extra["sinks"].grad] if sinks is not None else [])


@pytest.mark.parametrize("strategy, p, options, fields", [
    ("ulysses", 4, {}, dict(seq_len=23, heads=16, kv_heads=8, scheme="zigzag", causal=True, sinks=True)),
    ("usp", 4, {"ulysses_size": 2}, dict(seq_len=21, heads=8, kv_heads=8, scheme="stripe", causal=True,
                                         value_dim=4, window=(5, -1))),
    ("ulysses", 2, {}, dict(seq_len=40, heads=8, kv_heads=8, scheme="stripe", causal=True,
                            memory_layout="fused_qkv")),
])
def test_chunked_equals_unchunked_exactly(strategy, p, options, fields):
    """Heads are independent: every chunk count gives the unchunked result to rounding
    (USP measured up to 2 ulps: its elementwise kernels see tensors of other sizes), so a wrong head, KV head
    or sink index cannot hide in a tolerance."""
    problem = AttentionProblem(p, dtype="float64", seed=7, **fields)
    per = fields["kv_heads"] // options.get("ulysses_size", p)
    base = world(p).run(_exact_chunks, problem, strategy, {**options, "head_chunks": 1})
    for c in [c for c in _divisors(per) if c > 1]:
        got = world(p).run(_exact_chunks, problem, strategy, {**options, "head_chunks": c})
        for rank, (a, b) in enumerate(zip(base, got)):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-13, msg=lambda m: f"rank {rank}, c={c}: {m}")
