"""Independent, adversarial tests of the public contract (/work/shared/API.md).

Written from the contract and the public docstrings only, not from the implementation.
Covers: SeqLayout (all schemes, uneven lengths, P = 1..4), ring attention against a
float64 dense reference (forward and q/k/v gradients), input validation, cross-rank
mismatches (must raise on every rank, never hang), and the ring's communication volume.

Every worker is a module-level function so it pickles into the persistent gloo world.
"""
import re

import pytest
import torch

import seqpar
from seqpar.testing import world

TIMEOUT = 60
DTYPES = {"float64": torch.float64, "float32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16}
ELEM = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


# --------------------------------------------------------------------------------------
# Independent expectations
# --------------------------------------------------------------------------------------

def expected_positions(seq_len, P, r, scheme):
    idx = torch.arange(seq_len)
    if scheme == "contiguous":
        return idx.tensor_split(P)[r]
    if scheme == "zigzag":
        chunks = idx.tensor_split(2 * P)
        return torch.cat([chunks[r], chunks[2 * P - 1 - r]])
    if scheme == "stripe":
        return idx[r::P]
    raise AssertionError(scheme)


def dense_reference(q, k, v, dout, causal, scale):
    """float64 dense softmax attention over the global sequence, GQA by repeat_interleave
    (flash-attn convention: query head h uses kv head h // (H // H_kv)). Returns out, dq, dk, dv."""
    q = q.detach().double().requires_grad_()
    k = k.detach().double().requires_grad_()
    v = v.detach().double().requires_grad_()
    H, Hkv, D = q.shape[2], k.shape[2], q.shape[3]
    if scale is None:
        scale = D ** -0.5
    kk = k.repeat_interleave(H // Hkv, dim=2)
    vv = v.repeat_interleave(H // Hkv, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * scale
    if causal:
        n = q.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = torch.einsum("bhij,bjhd->bihd", p, vv)
    (out * dout.double()).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def make_global(cfg):
    g = torch.Generator().manual_seed(cfg.get("seed", 0))
    B, N, H, Hkv, D = cfg["B"], cfg["N"], cfg["H"], cfg["Hkv"], cfg["D"]
    mag = cfg.get("mag", 1.0)
    q = torch.randn(B, N, H, D, generator=g, dtype=torch.float64) * mag
    k = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64) * mag
    v = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64)
    dout = torch.randn(B, N, H, D, generator=g, dtype=torch.float64)
    dt = DTYPES[cfg.get("dtype", "float64")]
    # round the inputs to the tested dtype so the reference sees the same numbers
    return q.to(dt).double(), k.to(dt).double(), v.to(dt).double(), dout


# --------------------------------------------------------------------------------------
# Workers (run on every rank)
# --------------------------------------------------------------------------------------

def _rank():
    import torch.distributed as dist
    return dist.get_rank(), dist.get_world_size()


def _layout_worker(seq_len, scheme):
    r, P = _rank()
    lay = seqpar.SeqLayout(seq_len, scheme=scheme)
    pos = lay.positions()
    res = {
        "rank": lay.rank, "world_size": lay.world_size, "seq_len": lay.seq_len,
        "scheme": lay.scheme, "local_len": lay.local_len,
        "positions": pos.tolist(), "pos_dtype": pos.dtype,
        "shard_arange": lay.shard(torch.arange(seq_len), dim=0).tolist(),
    }
    g = torch.Generator().manual_seed(seq_len * 7 + len(scheme))
    x = torch.randn(2, seq_len, 3, generator=g)
    xl = lay.shard(x)  # default dim=1
    res["shard_x_ok"] = torch.equal(xl, x[:, pos])
    res["unshard_x"] = lay.unshard(xl)
    res["unshard_dim0"] = lay.unshard(lay.shard(torch.arange(seq_len), dim=0), dim=0)
    # differentiable, default: every rank computes the same loss from the global tensor
    w = torch.randn(2, seq_len, 3, generator=g)
    leaf = xl.clone().requires_grad_()
    y = lay.unshard(leaf)
    (y * w).sum().backward()
    res["grad_same_loss"] = leaf.grad
    res["grad_expect"] = w[:, pos]
    return res


def _layout_negdim_worker(seq_len, scheme):
    lay = seqpar.SeqLayout(seq_len, scheme=scheme)
    x = torch.arange(3 * seq_len).reshape(3, seq_len)
    xl = lay.shard(x, dim=-1)
    return torch.equal(xl, x[:, lay.positions()]), torch.equal(lay.unshard(xl, dim=-1), x)


def _unshard_reduce_grad_worker(seq_len, scheme):
    r, P = _rank()
    lay = seqpar.SeqLayout(seq_len, scheme=scheme)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(1, seq_len, 2, generator=g, dtype=torch.float64)
    leaf = torch.zeros(1, lay.local_len, 2, dtype=torch.float64, requires_grad=True)
    y = lay.unshard(leaf, reduce_grad=True)
    (y * w * (r + 1)).sum().backward()
    return leaf.grad, w[:, lay.positions()] * sum(range(1, P + 1))


def _layout_error_worker(case):
    if case == "seq_len_lt_P":
        seqpar.SeqLayout(1)
    elif case == "seq_len_zero":
        seqpar.SeqLayout(0)
    elif case == "seq_len_negative":
        seqpar.SeqLayout(-4)
    elif case == "unknown_scheme":
        seqpar.SeqLayout(8, scheme="zig-zag")
    elif case == "seq_len_str":
        seqpar.SeqLayout("8")
    elif case == "shard_wrong_size":
        seqpar.SeqLayout(8).shard(torch.arange(9), dim=0)
    elif case == "unshard_wrong_size":
        lay = seqpar.SeqLayout(8)
        lay.unshard(torch.zeros(1, lay.local_len + 1, 2))
    else:
        raise AssertionError(case)
    return "no error"


def _attn_worker(cfg):
    r, P = _rank()
    dt = DTYPES[cfg.get("dtype", "float64")]
    q, k, v, dout = make_global(cfg)
    layout = seqpar.SeqLayout(cfg["N"], scheme=cfg.get("scheme", "contiguous"))
    pos = layout.positions()
    ql, kl, vl = (t[:, pos].to(dt) for t in (q, k, v))
    if cfg.get("noncontig"):
        ql = ql.transpose(1, 2).contiguous().transpose(1, 2)        # bhsd storage
        kl = torch.cat([kl, torch.zeros_like(kl)], dim=-1)[..., : cfg["D"]]  # strided
        vl = torch.cat([torch.zeros_like(vl), vl], dim=-1)[..., cfg["D"]:]   # offset + strided
        assert not (ql.is_contiguous() or kl.is_contiguous() or vl.is_contiguous())
    rg = cfg.get("requires_grad", (True, True, True))
    for t, flag in zip((ql, kl, vl), rg):
        t.requires_grad_(flag)
    before = [t.detach().clone() for t in (ql, kl, vl)]
    kwargs = dict(causal=cfg.get("causal", False))
    if "scale" in cfg:
        kwargs["softmax_scale"] = cfg["scale"]
    if "backend" in cfg:
        kwargs["backend"] = cfg["backend"]
    if not cfg.get("layout_none"):
        kwargs["layout"] = layout
    fn = cfg.get("fn", "attention")
    if fn == "attention":
        out = seqpar.attention(ql, kl, vl, strategy=cfg.get("strategy", "ring"), **kwargs)
    else:
        out = seqpar.ring_attention(ql, kl, vl, **kwargs)
    res = {"pos": pos, "out": out.detach().double(), "out_dtype": out.dtype,
           "out_shape": tuple(out.shape), "out_requires_grad": out.requires_grad}
    if any(rg):
        (out.double() * dout[:, pos]).sum().backward()
    res["grads"] = [None if t.grad is None else t.grad.double() for t in (ql, kl, vl)]
    res["grad_dtypes"] = [None if t.grad is None else t.grad.dtype for t in (ql, kl, vl)]
    res["inputs_unchanged"] = all(torch.equal(a.detach(), b) for a, b in zip((ql, kl, vl), before))
    return res


def _bad_input_worker(case):
    B, N, H, Hkv, D = 1, 8, 4, 2, 8
    lay = seqpar.SeqLayout(N)
    n = lay.local_len
    q = torch.randn(B, n, H, D)
    k = torch.randn(B, n, Hkv, D)
    v = torch.randn(B, n, Hkv, D)
    kw = {}
    if case == "q_ndim":
        q = q[0]
    elif case == "k_ndim":
        k = k.unsqueeze(0)
    elif case == "v_ndim":
        v = v[0]
    elif case == "dtype_mismatch":
        k = k.double()
    elif case == "v_dtype_mismatch":
        v = v.half()
    elif case == "int_dtype":
        q, k, v = (t.long() for t in (q, k, v))
    elif case == "heads_not_divisible":
        q = torch.randn(B, n, 3, D)
    elif case == "kv_heads_exceed_q_heads":
        q = torch.randn(B, n, 2, D)
        k = torch.randn(B, n, 4, D)
        v = torch.randn(B, n, 4, D)
    elif case == "k_v_heads_differ":
        v = torch.randn(B, n, 1, D)
    elif case == "local_len_wrong":
        q, k, v = (t[:, :-1] for t in (q, k, v))
    elif case == "k_len_differs_from_q":
        k = k[:, :-1]
        v = v[:, :-1]
    elif case == "head_dim_mismatch":
        k = torch.randn(B, n, Hkv, D + 1)
        v = torch.randn(B, n, Hkv, D + 1)
    elif case == "batch_mismatch":
        k = torch.randn(B + 1, n, Hkv, D)
        v = torch.randn(B + 1, n, Hkv, D)
    elif case == "not_a_tensor":
        q = q.tolist()
    elif case == "unknown_strategy":
        kw["strategy"] = "ringg"
    elif case == "unknown_backend":
        kw["backend"] = "cudnn-magic"
    elif case == "flash_attn_unavailable":
        kw["backend"] = "flash_attn"
    elif case == "unknown_option":
        kw["strategy"] = "ring"
        kw["no_such_option"] = 3
    elif case == "layout_not_a_layout":
        kw["layout"] = "contiguous"
    elif case == "softmax_scale_str":
        kw["softmax_scale"] = "0.5"
    elif case == "softmax_scale_nan":
        kw["softmax_scale"] = float("nan")
    elif case == "causal_str":
        kw["causal"] = "yes"
    else:
        raise AssertionError(case)
    kw.setdefault("layout", lay)
    return seqpar.attention(q, k, v, **kw)


def _mismatch_worker(kind, base):
    """Rank 1 deviates from rank 0 in `kind`. `base` gives a fresh shape per test."""
    r, P = _rank()
    odd = r == 1
    N, B, H, Hkv, D = base["N"], 1, 4, 2, base["D"]
    dtype = torch.float32
    scheme = "contiguous"
    layout_none = False
    if kind == "head_dim" and odd:
        D += 1
    elif kind == "dtype" and odd:
        dtype = torch.float64
    elif kind == "seq_len" and odd:
        N += 1
    elif kind == "scheme" and odd:
        scheme = "zigzag"  # same local lengths, different positions
    elif kind == "batch" and odd:
        B += 1
    elif kind == "heads" and odd:
        H = 2
    elif kind == "kv_heads" and odd:
        Hkv = 1
    elif kind == "layout_none_uneven":
        layout_none = True
    lay = seqpar.SeqLayout(N, scheme=scheme)
    n = lay.local_len
    if kind == "layout_none_uneven" and odd:
        n += 1
    q = torch.randn(B, n, H, D, dtype=dtype)
    k = torch.randn(B, n, Hkv, D, dtype=dtype)
    v = torch.randn(B, n, Hkv, D, dtype=dtype)
    out = seqpar.attention(q, k, v, layout=None if layout_none else lay, causal=True, strategy="ring")
    return tuple(out.shape)


def _comm_worker(cfg, grad):
    r, P = _rank()
    dt = DTYPES[cfg["dtype"]]
    B, N, H, Hkv, D = cfg["B"], cfg["N"], cfg["H"], cfg["Hkv"], cfg["D"]
    lay = seqpar.SeqLayout(N, scheme=cfg["scheme"])
    n = lay.local_len
    g = torch.Generator().manual_seed(r)
    q = torch.randn(B, n, H, D, generator=g).to(dt)
    k = torch.randn(B, n, Hkv, D, generator=g).to(dt)
    v = torch.randn(B, n, Hkv, D, generator=g).to(dt)
    # warm-up call: any one-time agreement traffic happens here, not in the tracked call
    with torch.no_grad():
        seqpar.ring_attention(q, k, v, layout=lay, causal=True)
    with torch.no_grad(), seqpar.comm.track() as s:
        seqpar.ring_attention(q, k, v, layout=lay, causal=True)
    # everything but the per-call agreement check (a 16-byte digest all-reduce) is ring traffic
    res = {"local_len": n, "sent": s.bytes_sent() - s.bytes_sent("check"),
           "recv": s.bytes_received() - s.bytes_received("check"),
           "sent_fwd": s.bytes_sent("ring.forward"), "recv_fwd": s.bytes_received("ring.forward")}
    if grad:
        q.requires_grad_()
        k.requires_grad_()
        v.requires_grad_()
        out = seqpar.ring_attention(q, k, v, layout=lay, causal=True)
        with seqpar.comm.track() as s2:
            out.float().sum().backward()
        res["bwd_sent"] = s2.bytes_sent()
        res["bwd_recv"] = s2.bytes_received()
    return res


# --------------------------------------------------------------------------------------
# SeqLayout
# --------------------------------------------------------------------------------------

SCHEMES = ["contiguous", "zigzag", "stripe"]


def _layout_cases():
    for P in (1, 2, 3, 4):
        for N in sorted({P, P + 1, 2 * P - 1, 2 * P, 2 * P + 1, 4 * P + 3, 17}):
            if N < P:
                continue
            for scheme in SCHEMES:
                yield P, N, scheme


@pytest.mark.parametrize("P,N,scheme", list(_layout_cases()))
def test_layout_partition_and_roundtrip(P, N, scheme):
    res = world(P).run(_layout_worker, N, scheme, timeout=TIMEOUT)
    allpos = []
    for r, d in enumerate(res):
        assert d["rank"] == r and d["world_size"] == P
        assert d["seq_len"] == N and d["scheme"] == scheme
        assert d["pos_dtype"] == torch.long
        assert d["local_len"] == len(d["positions"])
        # shard(arange) == positions
        assert d["shard_arange"] == d["positions"], (r, d["shard_arange"], d["positions"])
        assert d["shard_x_ok"]
        # unshard(shard(x)) == x on every rank
        g = torch.Generator().manual_seed(N * 7 + len(scheme))
        x = torch.randn(2, N, 3, generator=g)
        assert torch.equal(d["unshard_x"], x), r
        assert torch.equal(d["unshard_dim0"], torch.arange(N)), r
        # unshard differentiable; every rank same loss -> own rows of the gradient
        torch.testing.assert_close(d["grad_same_loss"], d["grad_expect"])
        allpos += d["positions"]
    assert sorted(allpos) == list(range(N)), "positions must partition range(seq_len)"
    # sizes: tensor_split semantics per chunk
    lens = [d["local_len"] for d in res]
    if scheme == "contiguous":
        assert max(lens) - min(lens) <= 1
    elif scheme == "zigzag":
        assert max(lens) - min(lens) <= 2


@pytest.mark.parametrize("P,N,scheme", list(_layout_cases()))
def test_layout_exact_assignment(P, N, scheme):
    """Exact chunk assignment: contiguous runs in rank order, zigzag chunks r and 2P-1-r of a
    tensor_split into 2P, stripe i mod P (ascending local order)."""
    res = world(P).run(_layout_worker, N, scheme, timeout=TIMEOUT)
    for r, d in enumerate(res):
        exp = expected_positions(N, P, r, scheme).tolist()
        assert d["positions"] == exp, f"rank {r}: got {d['positions']}, expected {exp}"


def test_layout_negative_dim():
    for P, N, scheme in ((2, 7, "zigzag"), (3, 10, "stripe")):
        res = world(P).run(_layout_negdim_worker, N, scheme, timeout=TIMEOUT)
        assert all(a and b for a, b in res), res


def test_unshard_reduce_grad():
    for P, N, scheme in ((2, 9, "zigzag"), (3, 7, "stripe")):
        res = world(P).run(_unshard_reduce_grad_worker, N, scheme, timeout=TIMEOUT)
        for got, exp in res:
            torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("case,words,P", [
    ("seq_len_lt_P", ["seq_len"], 2),
    ("seq_len_zero", ["seq_len"], 1),
    ("seq_len_negative", ["seq_len"], 2),
    ("unknown_scheme", ["scheme"], 2),
    ("seq_len_str", ["seq_len"], 2),
    ("shard_wrong_size", ["seq_len", "9"], 2),
    ("unshard_wrong_size", ["local_len", "x_local"], 2),
])
def test_layout_errors(case, words, P):
    res = world(P).run(_layout_error_worker, case, return_exceptions=True, timeout=TIMEOUT)
    for e in res:
        assert isinstance(e, (ValueError, TypeError)), f"{case}: got {e!r}"
        assert any(w.lower() in str(e).lower() for w in words), f"{case}: message {str(e)!r} names none of {words}"


# --------------------------------------------------------------------------------------
# Ring attention vs dense float64
# --------------------------------------------------------------------------------------

TOL = {"float64": dict(atol=1e-9, rtol=1e-9), "float32": dict(atol=2e-4, rtol=2e-4),
       "bfloat16": dict(atol=6e-2, rtol=6e-2), "float16": dict(atol=1e-2, rtol=1e-2)}


def check_attention(P, cfg):
    cfg = dict(cfg)
    res = world(P).run(_attn_worker, cfg, timeout=TIMEOUT)
    q, k, v, dout = make_global(cfg)
    out, dq, dk, dv = dense_reference(q, k, v, dout, cfg.get("causal", False), cfg.get("scale"))
    dtname = cfg.get("dtype", "float64")
    dt = DTYPES[dtname]
    tol = TOL[dtname]
    rg = cfg.get("requires_grad", (True, True, True))
    seen = []
    for r, d in enumerate(res):
        pos = d["pos"]
        seen += pos.tolist()
        assert d["out_dtype"] == dt, f"rank {r}: output dtype {d['out_dtype']} != input {dt}"
        assert d["out_shape"] == (cfg["B"], len(pos), cfg["H"], cfg["D"])
        assert d["inputs_unchanged"], f"rank {r}: inputs were modified in place"
        assert torch.isfinite(d["out"]).all(), f"rank {r}: non-finite output"
        torch.testing.assert_close(d["out"], out[:, pos], **tol, msg=lambda m: f"rank {r} out: {m}")
        for name, got, ref, flag, gdt in zip("qkv", d["grads"], (dq, dk, dv), rg, d["grad_dtypes"]):
            if not flag:
                assert got is None, f"rank {r}: d{name} populated for an input without requires_grad"
                continue
            assert got is not None, f"rank {r}: no gradient for {name}"
            assert gdt == dt, f"rank {r}: d{name} dtype {gdt} != input dtype {dt}"
            torch.testing.assert_close(got, ref[:, pos], **tol, msg=lambda m: f"rank {r} d{name}: {m}")
        if not any(rg):
            assert not d["out_requires_grad"]
    assert sorted(seen) == list(range(cfg["N"]))


def _sweep_cases():
    cases = []
    for P in (1, 2, 3, 4):
        for scheme in SCHEMES:
            for N in sorted({P, 2 * P + 1, 4 * P + 3}):
                for causal in (False, True):
                    cases.append((P, scheme, N, causal))
    return cases


@pytest.mark.parametrize("P,scheme,N,causal", _sweep_cases())
def test_ring_sweep_float64(P, scheme, N, causal):
    check_attention(P, dict(B=1, N=N, H=4, Hkv=2, D=5, causal=causal, scheme=scheme, seed=N + P))


FEATURES = {
    "mha": dict(H=3, Hkv=3),
    "gqa_3to1": dict(H=6, Hkv=2),
    "mqa": dict(H=4, Hkv=1),
    "head_dim_1": dict(D=1),
    "head_dim_7": dict(D=7),
    "head_dim_65": dict(D=65, N=7),
    "scale_small": dict(scale=0.05),
    "scale_one": dict(scale=1.0),
    "scale_zero": dict(scale=0.0),
    "scale_negative": dict(scale=-0.7),
    "scale_tiny": dict(scale=1e-30),
    "scale_large_fp32": dict(scale=8.0, mag=3.0, dtype="float32"),
    "batch_3": dict(B=3),
    "noncontig": dict(noncontig=True),
    "noncontig_gqa_batch": dict(noncontig=True, B=2, H=6, Hkv=3),
    "only_q_grad": dict(requires_grad=(True, False, False)),
    "only_kv_grad": dict(requires_grad=(False, True, True)),
    "only_v_grad": dict(requires_grad=(False, False, True)),
    "no_grad": dict(requires_grad=(False, False, False)),
    "float32": dict(dtype="float32"),
    "bfloat16": dict(dtype="bfloat16"),
    "float16": dict(dtype="float16"),
    "backend_torch_f64": dict(backend="torch"),
    "backend_auto_f64": dict(backend="auto"),
    "backend_sdpa_f32": dict(backend="sdpa", dtype="float32"),
    "backend_sdpa_bf16": dict(backend="sdpa", dtype="bfloat16"),
    "backend_sdpa_mqa_noncontig": dict(backend="sdpa", dtype="float32", H=4, Hkv=1, noncontig=True),
    "backend_sdpa_head_dim_128": dict(backend="sdpa", dtype="float32", D=128, N=7),
    "backend_torch_fp16": dict(backend="torch", dtype="float16"),
    "backend_sdpa_fp16": dict(backend="sdpa", dtype="float16"),
    "scale_int": dict(scale=1),
    "fp16_large_logits": dict(dtype="float16", mag=30.0, D=16),
    "bf16_large_logits": dict(dtype="bfloat16", mag=30.0, D=16),
    "strategy_auto": dict(strategy="auto"),
    "ring_attention_fn": dict(fn="ring_attention"),
    "layout_none_equal": dict(layout_none=True, N=12, scheme="contiguous"),
    "seq_len_eq_P_zigzag": dict(N=3),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_ring_features(feature, causal):
    cfg = dict(B=1, N=11, H=4, Hkv=2, D=6, scheme="zigzag", causal=causal, seed=3)
    cfg.update(FEATURES[feature])
    check_attention(3, cfg)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_ring_low_precision_other_schemes(dtype):
    for P, scheme, N in ((2, "stripe", 9), (4, "contiguous", 10)):
        check_attention(P, dict(B=2, N=N, H=4, Hkv=1, D=8, causal=True, scheme=scheme,
                                dtype=dtype, seed=11))


# --------------------------------------------------------------------------------------
# Bad input on all ranks: ValueError / TypeError naming the argument
# --------------------------------------------------------------------------------------

BAD = [
    ("q_ndim", ["q"], (ValueError,)),
    ("k_ndim", ["k"], (ValueError,)),
    ("v_ndim", ["v"], (ValueError,)),
    ("dtype_mismatch", ["dtype"], (ValueError, TypeError)),
    ("v_dtype_mismatch", ["dtype"], (ValueError, TypeError)),
    ("int_dtype", ["dtype"], (ValueError, TypeError)),
    ("heads_not_divisible", ["H_kv", "heads"], (ValueError,)),
    ("kv_heads_exceed_q_heads", ["H_kv", "heads"], (ValueError,)),
    ("k_v_heads_differ", ["v"], (ValueError,)),
    ("local_len_wrong", ["local_len", "layout"], (ValueError,)),
    ("k_len_differs_from_q", ["k"], (ValueError,)),
    ("head_dim_mismatch", ["head_dim", "D"], (ValueError,)),
    ("batch_mismatch", ["batch", "B"], (ValueError,)),
    ("not_a_tensor", ["q"], (TypeError,)),
    ("unknown_strategy", ["strategy"], (ValueError,)),
    ("unknown_backend", ["backend"], (ValueError,)),
    ("flash_attn_unavailable", ["flash"], (ValueError, ImportError, RuntimeError)),
    ("unknown_option", ["no_such_option"], (ValueError, TypeError)),
    ("layout_not_a_layout", ["layout"], (TypeError, ValueError)),
    ("softmax_scale_str", ["softmax_scale"], (TypeError,)),     # wrong type -> TypeError
    ("softmax_scale_nan", ["softmax_scale"], (ValueError,)),
    ("causal_str", ["causal"], (TypeError,)),
]


def _names(msg, word):
    # the argument name as a word (so "q" does not match inside "sequence")
    return re.search(r"(?<![A-Za-z0-9])" + re.escape(word.lower()) + r"(?![A-Za-z0-9])", msg.lower()) is not None


@pytest.mark.parametrize("case,words,types", BAD, ids=[c for c, _, _ in BAD])
def test_bad_input(case, words, types):
    res = world(2).run(_bad_input_worker, case, return_exceptions=True, timeout=TIMEOUT)
    for r, e in enumerate(res):
        assert isinstance(e, types), f"{case} rank {r}: expected {types}, got {e!r}"
        assert any(_names(str(e), w) for w in words), f"{case} rank {r}: message {str(e)!r} names none of {words}"


# --------------------------------------------------------------------------------------
# Mismatch between ranks: raise on every rank, never hang; world usable afterwards
# --------------------------------------------------------------------------------------

MISMATCH = {
    "head_dim": dict(N=14, D=9),
    "dtype": dict(N=18, D=11),
    "seq_len": dict(N=22, D=13),
    "scheme": dict(N=26, D=15),
    "batch": dict(N=30, D=17),
    "heads": dict(N=34, D=19),
    "kv_heads": dict(N=38, D=21),
    "layout_none_uneven": dict(N=42, D=23),
}


@pytest.mark.parametrize("kind", list(MISMATCH))
def test_mismatch_raises_on_every_rank(kind):
    res = world(2).run(_mismatch_worker, kind, MISMATCH[kind], return_exceptions=True, timeout=TIMEOUT)
    assert all(isinstance(e, BaseException) for e in res), f"{kind}: per-rank results {res!r}"
    assert all(isinstance(e, (ValueError, TypeError)) for e in res), f"{kind}: {res!r}"
    # the world (and seqpar's state) must still work after the failed call
    check_attention(2, dict(B=1, N=MISMATCH[kind]["N"] + 1, H=4, Hkv=2, D=MISMATCH[kind]["D"],
                            causal=True, scheme="zigzag", seed=1))


# --------------------------------------------------------------------------------------
# Communication volume of the ring forward
# --------------------------------------------------------------------------------------

COMM = [
    (2, dict(N=9, scheme="contiguous", dtype="float32")),
    (3, dict(N=10, scheme="contiguous", dtype="float32")),
    (3, dict(N=13, scheme="zigzag", dtype="bfloat16")),
    (4, dict(N=11, scheme="stripe", dtype="float64")),
    (4, dict(N=4, scheme="zigzag", dtype="float16")),
    (1, dict(N=5, scheme="contiguous", dtype="float32")),
]


def _causal_rows_seen(positions, s, q):
    """Rows of rank s's keys (local order ascends in position) that some causal query of
    rank q sees: those at or before q's last position."""
    if len(positions[q]) == 0:
        return 0
    return int((positions[s] <= positions[q].max()).sum())


@pytest.mark.parametrize("P,cfg", COMM)
def test_ring_forward_bytes(P, cfg):
    cfg = dict(cfg, B=2, H=4, Hkv=2, D=3)
    res = world(P).run(_comm_worker, cfg, False, timeout=TIMEOUT)
    lens = [d["local_len"] for d in res]
    per_tok = 2 * cfg["B"] * cfg["Hkv"] * cfg["D"] * ELEM[cfg["dtype"]]
    positions = [seqpar.SeqLayout.simulated(cfg["N"], P, r, cfg["scheme"]).positions() for r in range(P)]

    def rows_on(src, step):
        """K/V rows of rank src that travel into rank src+step: those that rank src+step
        or any rank after it on the ring (up to src+P-1) sees (causal)."""
        return max([_causal_rows_seen(positions, src, (src + u) % P) for u in range(step, P)], default=0)

    for r, d in enumerate(res):
        # K/V pass to the next rank for up to P-1 steps: at step s rank r holds the block of
        # rank (r - s) mod P and sends on the rows of it that a later rank still sees
        exp_sent = per_tok * sum(rows_on((r - s) % P, s + 1) for s in range(P - 1))
        # and receives, at step s, the rows of rank (r - 1 - s) that it or a later rank sees
        exp_recv = per_tok * sum(rows_on((r - 1 - s) % P, s + 1) for s in range(P - 1))
        assert d["sent_fwd"] == exp_sent, f"rank {r}: ring.forward sent {d['sent_fwd']} != {exp_sent} (lens {lens})"
        assert d["sent"] == exp_sent, f"rank {r}: total sent {d['sent']} != {exp_sent} (lens {lens})"
        assert d["recv_fwd"] == exp_recv, f"rank {r}: ring.forward received {d['recv_fwd']} != {exp_recv}"


def test_ring_backward_moves_kv_and_grads():
    """Backward: K,V circulate again with dK,dV (fp32 accumulators) -> strictly more than
    the forward's K/V volume on every rank of a P>1 ring, and nothing in the P=1 case."""
    cfg = dict(N=10, scheme="zigzag", dtype="bfloat16", B=1, H=2, Hkv=1, D=4)
    res = world(3).run(_comm_worker, cfg, True, timeout=TIMEOUT)
    for r, d in enumerate(res):
        assert d["bwd_sent"] > d["sent_fwd"] > 0, (r, d)
    res1 = world(1).run(_comm_worker, cfg, True, timeout=TIMEOUT)
    assert res1[0]["bwd_sent"] == 0 and res1[0]["sent"] == 0


# --------------------------------------------------------------------------------------
# Autograd edge cases: zero-stride / non-contiguous grad_output, shared and packed inputs
# --------------------------------------------------------------------------------------

def _autograd_worker(mode, cfg):
    r, P = _rank()
    q, k, v, dout = make_global(cfg)
    lay = seqpar.SeqLayout(cfg["N"], scheme=cfg["scheme"])
    pos = lay.positions()
    ql, kl, vl, dl = (t[:, pos].clone() for t in (q, k, v, dout))
    causal = cfg["causal"]
    res = {"pos": pos}
    if mode == "sum_backward":          # grad_output is an expanded, zero-stride tensor
        a, b, c = (t.requires_grad_() for t in (ql, kl, vl))
        seqpar.attention(a, b, c, layout=lay, causal=causal, strategy="ring").sum().backward()
        res["grads"] = [a.grad, b.grad, c.grad]
    elif mode == "transposed_grad":     # grad_output arrives non-contiguous
        a, b, c = (t.requires_grad_() for t in (ql, kl, vl))
        out = seqpar.attention(a, b, c, layout=lay, causal=causal, strategy="ring")
        (out.transpose(1, 2) * dl.transpose(1, 2).contiguous()).sum().backward()
        res["grads"] = [a.grad, b.grad, c.grad]
    elif mode == "retain_graph_twice":
        a, b, c = (t.requires_grad_() for t in (ql, kl, vl))
        out = seqpar.attention(a, b, c, layout=lay, causal=causal, strategy="ring")
        (out * dl).sum().backward(retain_graph=True)
        (out * dl).sum().backward()
        res["grads"] = [a.grad / 2, b.grad / 2, c.grad / 2]
    elif mode == "packed_qkv":          # q, k, v are views of one leaf
        qkv = torch.stack([ql, kl, vl], dim=2).requires_grad_()
        a, b, c = qkv.unbind(2)
        out = seqpar.attention(a, b, c, layout=lay, causal=causal, strategy="ring")
        (out * dl).sum().backward()
        res["grads"] = list(qkv.grad.unbind(2))
    elif mode == "shared_qkv":          # the same tensor passed as q, k and v
        x = ql.requires_grad_()
        out = seqpar.attention(x, x, x, layout=lay, causal=causal, strategy="ring")
        (out * dl).sum().backward()
        res["grads"] = [x.grad]
    elif mode in ("no_grad_ctx", "inference_mode"):
        a, b, c = (t.requires_grad_() for t in (ql, kl, vl))
        ctx = torch.no_grad() if mode == "no_grad_ctx" else torch.inference_mode()
        with ctx:
            out = seqpar.attention(a, b, c, layout=lay, causal=causal, strategy="ring")
        res["requires_grad"] = out.requires_grad
        res["out"] = out.clone() if mode == "no_grad_ctx" else out.clone()
        res["grads"] = None
    else:
        raise AssertionError(mode)
    return res


@pytest.mark.parametrize("mode", ["sum_backward", "transposed_grad", "retain_graph_twice",
                                  "packed_qkv", "shared_qkv", "no_grad_ctx", "inference_mode"])
def test_autograd_edge_cases(mode):
    same = mode in ("packed_qkv", "shared_qkv")
    cfg = dict(B=2, N=10, H=3, Hkv=3 if same else 1, D=4, scheme="zigzag", causal=True, seed=21)
    res = world(3).run(_autograd_worker, mode, cfg, timeout=TIMEOUT)
    q, k, v, dout = make_global(cfg)
    if mode == "sum_backward":
        dout = torch.ones_like(dout)
    if mode == "shared_qkv":
        k, v = q, q
    out, dq, dk, dv = dense_reference(q, k, v, dout, True, None)
    for r, d in enumerate(res):
        pos = d["pos"]
        if d["grads"] is None:
            assert not d["requires_grad"], f"rank {r}: output requires grad under {mode}"
            torch.testing.assert_close(d["out"], out[:, pos], atol=1e-9, rtol=1e-9)
            continue
        refs = [dq + dk + dv] if mode == "shared_qkv" else [dq, dk, dv]
        for name, got, ref in zip("qkv", d["grads"], refs):
            torch.testing.assert_close(got, ref[:, pos], atol=1e-9, rtol=1e-9,
                                       msg=lambda m: f"rank {r} d{name} ({mode}): {m}")


# --------------------------------------------------------------------------------------
# Sub-groups: layout/attention on a group that is not the world, ranks not contiguous
# --------------------------------------------------------------------------------------

def _subgroup_worker(rank_lists, cfg):
    import torch.distributed as dist
    r, P = _rank()
    groups = [dist.new_group(ranks) for ranks in rank_lists]   # collective, same order everywhere
    gi = next(i for i, ranks in enumerate(rank_lists) if r in ranks)
    grp = groups[gi]
    c = dict(cfg, seed=100 + gi)
    q, k, v, dout = make_global(c)
    lay = seqpar.SeqLayout(c["N"], group=grp, scheme=c["scheme"])
    pos = lay.positions()
    a, b, cc = (t[:, pos].clone().requires_grad_() for t in (q, k, v))
    out = seqpar.attention(a, b, cc, layout=lay, causal=c["causal"], strategy="ring")
    (out * dout[:, pos]).sum().backward()
    ul = lay.unshard(pos.view(1, -1), dim=1)
    return {"gi": gi, "rank": lay.rank, "world_size": lay.world_size, "pos": pos,
            "out": out.detach(), "grads": [a.grad, b.grad, cc.grad], "unshard": ul}


@pytest.mark.parametrize("rank_lists", [[[0, 1], [2, 3]], [[0, 2], [1, 3]], [[3, 1, 0], [2]]],
                         ids=["pairs", "interleaved", "reversed_and_single"])
def test_subgroups(rank_lists):
    cfg = dict(B=1, N=9, H=2, Hkv=1, D=4, scheme="zigzag", causal=True)
    res = world(4).run(_subgroup_worker, rank_lists, cfg, timeout=TIMEOUT)
    for r, d in enumerate(res):
        ranks = rank_lists[d["gi"]]
        assert d["world_size"] == len(ranks), (r, d["world_size"])
        # torch.distributed numbers a group's ranks in sorted global order
        assert d["rank"] == sorted(ranks).index(r), (r, d["rank"])
        c = dict(cfg, seed=100 + d["gi"])
        q, k, v, dout = make_global(c)
        out, dq, dk, dv = dense_reference(q, k, v, dout, True, None)
        pos = d["pos"]
        assert torch.equal(d["unshard"], torch.arange(cfg["N"]).view(1, -1)), f"rank {r}: unshard on sub-group"
        torch.testing.assert_close(d["out"], out[:, pos], atol=1e-9, rtol=1e-9, msg=lambda m: f"rank {r} out: {m}")
        for name, got, ref in zip("qkv", d["grads"], (dq, dk, dv)):
            torch.testing.assert_close(got, ref[:, pos], atol=1e-9, rtol=1e-9, msg=lambda m: f"rank {r} d{name}: {m}")
    # positions of each group partition range(N)
    for gi in range(len(rank_lists)):
        allpos = sorted(sum((d["pos"].tolist() for d in res if d["gi"] == gi), []))
        assert allpos == list(range(cfg["N"]))


# --------------------------------------------------------------------------------------
# unshard of other dtypes / non-contiguous locals
# --------------------------------------------------------------------------------------

def _unshard_kinds_worker(kind):
    lay = seqpar.SeqLayout(7, scheme="stripe")
    x = torch.arange(2 * 7 * 3).reshape(2, 7, 3)
    if kind == "bfloat16":
        x = x.to(torch.bfloat16)
    elif kind == "bool":
        x = x % 3 == 0
    elif kind == "float16":
        x = x.half()
    xl = lay.shard(x)
    if kind == "noncontig":
        xl = xl.transpose(0, 2).contiguous().transpose(0, 2)
        assert not xl.is_contiguous()
    y = lay.unshard(xl)
    return y.dtype == x.dtype and torch.equal(y, x)


@pytest.mark.parametrize("kind", ["int64", "bfloat16", "float16", "bool", "noncontig"])
def test_unshard_dtypes_and_strides(kind):
    res = world(2).run(_unshard_kinds_worker, kind, timeout=TIMEOUT)
    assert res == [True, True], res


# --------------------------------------------------------------------------------------
# Cross-rank mismatch after a cached agreement, and a causal mismatch
# --------------------------------------------------------------------------------------

def _cached_then_mismatch_worker(N, D):
    r, P = _rank()
    lay = seqpar.SeqLayout(N)
    n = lay.local_len
    q = torch.randn(1, n, 2, D)
    seqpar.attention(q, q, q, layout=lay, strategy="ring")          # agreement succeeds, cached
    dt = torch.float64 if r == 1 else torch.float32                  # rank 0 repeats the cached call
    q2 = torch.randn(1, n, 2, D, dtype=dt)
    return tuple(seqpar.attention(q2, q2, q2, layout=lay, strategy="ring").shape)


def test_mismatch_after_cached_agreement_does_not_hang():
    res = world(2).run(_cached_then_mismatch_worker, 46, 25, return_exceptions=True, timeout=120)
    assert all(isinstance(e, BaseException) for e in res), f"per-rank results {res!r}"


def _causal_mismatch_worker(N, D):
    r, P = _rank()
    lay = seqpar.SeqLayout(N)
    q = torch.randn(1, lay.local_len, 2, D)
    return tuple(seqpar.attention(q, q, q, layout=lay, strategy="ring", causal=(r == 0)).shape)


def test_causal_mismatch_raises_on_every_rank():
    """Contract lists shapes/dtypes/seq_len/scheme; `causal` differing is the same class of
    caller error (silently wrong rows otherwise)."""
    res = world(2).run(_causal_mismatch_worker, 50, 27, return_exceptions=True, timeout=TIMEOUT)
    assert all(isinstance(e, (ValueError, TypeError)) for e in res), f"per-rank results {res!r}"


def _sdpa_f64_worker():
    lay = seqpar.SeqLayout(6)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 2, 4, generator=g, dtype=torch.float64)
    ql = lay.shard(q)
    try:
        out = seqpar.attention(ql, ql, ql, layout=lay, strategy="ring", backend="sdpa")
    except (ValueError, TypeError) as e:
        return "error", str(e)
    return "ok", (out.dtype, lay.positions(), out)


def test_sdpa_backend_float64_runs_or_refuses_clearly():
    res = world(2).run(_sdpa_f64_worker, timeout=TIMEOUT)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 2, 4, generator=g, dtype=torch.float64)
    out = dense_reference(q, q, q, torch.zeros_like(q), False, None)[0]
    for kind, val in res:
        if kind == "error":
            assert "backend" in val.lower() or "dtype" in val.lower(), val
        else:
            dt, pos, o = val
            assert dt == torch.float64
            torch.testing.assert_close(o, out[:, pos], atol=1e-9, rtol=1e-9)


# --------------------------------------------------------------------------------------
# Run last: these can kill rank processes. Each closes its world so later runs start fresh.
# --------------------------------------------------------------------------------------

def _alternating_cached_worker(N):
    import torch.distributed as dist
    r = dist.get_rank()
    lay = seqpar.SeqLayout(N)
    n = lay.local_len
    a = torch.randn(1, n, 2, 8)
    b = torch.randn(1, n, 2, 10)
    seqpar.attention(a, a, a, layout=lay, strategy="ring")   # both signatures agreed once ...
    seqpar.attention(b, b, b, layout=lay, strategy="ring")
    x = a if r == 0 else b                                   # ... then each rank uses a different one
    return tuple(seqpar.attention(x, x, x, layout=lay, strategy="ring").shape)


def test_mismatch_between_two_cached_signatures_is_detected():
    try:
        res = world(2).run(_alternating_cached_worker, 62, return_exceptions=True, timeout=120)
        assert all(isinstance(e, (ValueError, TypeError)) for e in res), f"per-rank results {res!r}"
    finally:
        world(2).close()


def _die_on_rank1():
    import os
    import torch.distributed as dist
    if dist.get_rank() == 1:
        os._exit(3)
    return "survived"


def _ok():
    return "ok"


def test_testing_world_recovers_from_a_dead_rank():
    """seqpar.testing: a rank process that dies must surface as an error of `run` (not a
    hang), and the next `world(P)` must be a working world."""
    try:
        with pytest.raises(Exception):
            world(2).run(_die_on_rank1, timeout=20)
        assert world(2).run(_ok, timeout=120) == ["ok", "ok"]
    finally:
        world(2).close()
