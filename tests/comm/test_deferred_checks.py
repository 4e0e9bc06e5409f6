"""Device value checks without a host sync (`seqpar.comm.deferred`): a linear-attention
decay > 0 on a GPU is found after the call and raised, on every rank, at the next seqpar
call. This CPU build queues CPU checks the same way under `_defer_on_cpu`; the GPU test
below counts real synchronisations."""
import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.comm import deferred
from seqpar.testing import world


def _decays(bad_rank):
    good = torch.tensor([-0.5, -1.0])
    bad = torch.tensor([0.25, -1.0])
    return bad if dist.get_rank() == bad_rank else good


def _deferred_run(mode: str, bad_rank: int):
    """Call 1: linear attention, `bad_rank` with a positive decay. Call 2: ring attention,
    valid everywhere. Returns what each call did on this rank."""
    layout = seqpar.SeqLayout(16)
    q = torch.randn(1, layout.local_len, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    deferred._defer_on_cpu, deferred._mode = True, mode
    deferred._pending.clear()
    seen = []
    try:
        for call in (lambda: seqpar.linear_attention(q, q, q, layout=layout, decay=_decays(bad_rank)),
                     lambda: seqpar.ring_attention(q, q, q, layout=layout, causal=True)):
            try:
                call()
                seen.append("ran")
            except ValueError as exc:
                seen.append("raised: " + str(exc))
        seen.append(deferred.pending())
    finally:
        deferred._defer_on_cpu, deferred._mode = False, "deferred"
        deferred._pending.clear()
    return seen


def test_a_deferred_failure_stops_the_next_call_on_every_rank():
    got = world(2).run(_deferred_run, "deferred", 1)
    # the bad call itself ran (its device work would already be queued on a GPU)
    assert [g[0] for g in got] == ["ran", "ran"]
    bad, other = got[1][1], got[0][1]
    assert bad.startswith("raised: decay: expected log-space values <= 0") and "got a maximum of 0.25" in bad
    assert "in an earlier call on this rank" in bad and "set_value_checks('sync')" in bad
    assert other.startswith("raised: ") and "rank 1 of the group got bad input" in other and "0.25" in other
    assert [g[2] for g in got] == [0, 0]  # the failure was consumed; the failed call queued nothing


def test_sync_mode_raises_within_the_call():
    got = world(2).run(_deferred_run, "sync", 0)
    assert got[0][0].startswith("raised: decay: expected log-space values <= 0")
    assert "earlier call" not in got[0][0]
    assert "rank 0 of the group got bad input" in got[1][0]
    assert [g[1] for g in got] == ["ran", "ran"]


def test_cpu_checks_stay_immediate():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match=r"decay: expected log-space values <= 0 .*got a maximum of nan"):
        seqpar.linear_attention(q, q, q, decay=torch.tensor([float("nan"), -1.0]))
    assert deferred.pending() == 0


def test_modes_are_checked():
    with pytest.raises(ValueError, match=r"mode: expected one of \('deferred', 'sync'\), got 'later'"):
        seqpar.comm.set_value_checks("later")


@pytest.mark.gpu
def test_no_host_sync_per_call_on_cuda():
    """With CUDA's sync debug mode set to error, any host sync raises: the calls of a layer
    (softmax by ring on one rank, linear attention with a decay, the delta rule) make none."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, 256, 4, 64, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    decay = -torch.rand(1, 256, 4, device=dev, generator=g)
    beta = torch.rand(1, 256, 4, device=dev, generator=g)
    kn = torch.nn.functional.normalize(k.float(), dim=-1).to(k.dtype)
    for _ in range(2):  # the first calls warm caches (kernel checks, plans), which may sync once
        seqpar.attention(q, k, v, causal=True)
        seqpar.linear_attention(q, k, v, decay=decay)
        seqpar.delta_attention(q, kn, v, beta, decay=decay)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        seqpar.attention(q, k, v, causal=True)
        seqpar.linear_attention(q, k, v, decay=decay)
        seqpar.delta_attention(q, kn, v, beta, decay=decay)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    bad = decay.clone()
    bad[0, 0, 0] = 0.5
    seqpar.linear_attention(q, k, v, decay=bad)  # queued, not raised
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="in an earlier call on this rank"):
        seqpar.linear_attention(q, k, v, decay=decay)
