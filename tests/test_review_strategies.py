"""Adversarial review tests of the exact-attention strategies (ulysses, usp, allgather,
token_ring, attention(strategy=...)), written from /work/shared/API.md and the public
docstrings only.

Every case builds the global float64 problem from a seed on every rank, takes this rank's
rows with positions computed here from the contract (not from SeqLayout.shard), runs the
strategy, and compares the output and the q/k/v gradients with a float64 dense reference
(global positions, GQA by repeating KV heads). All collectives (forward and backward) run
before any assertion, so a numerical failure on one rank never strands the others.
"""
import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.testing import world

import os
TIMEOUT = float(os.environ.get("REVIEW_TIMEOUT", 90))
DT = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
TOL = {"float64": 1e-9, "float32": 2e-4, "bfloat16": 6e-2}
STRATS = ["ulysses", "usp", "allgather", "token_ring_direct", "token_ring_ring"]
SCHEMES = ["contiguous", "zigzag", "stripe"]


# ------------------------------------------------------------------------------------
# independent expectations
# ------------------------------------------------------------------------------------

def my_positions(N, P, r, scheme):
    idx = torch.arange(N)
    if scheme == "contiguous":
        return idx.tensor_split(P)[r]
    if scheme == "zigzag":
        c = idx.tensor_split(2 * P)
        return torch.cat([c[r], c[2 * P - 1 - r]])
    if scheme == "stripe":
        return idx[r::P]
    raise AssertionError(scheme)


def dense(Q, K, V, DO, causal, scale):
    Q, K, V = (t.detach().clone().double().requires_grad_() for t in (Q, K, V))
    H, Hkv, D = Q.shape[2], K.shape[2], Q.shape[3]
    scale = D ** -0.5 if scale is None else scale
    KK = K.repeat_interleave(H // Hkv, dim=2)
    VV = V.repeat_interleave(H // Hkv, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", Q, KK) * scale
    if causal:
        N = Q.shape[1]
        s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), VV)
    (out * DO).sum().backward()
    return out.detach(), Q.grad, K.grad, V.grad


def call(strategy, q, k, v, layout, cfg):
    kw = dict(layout=layout, causal=cfg.get("causal", True), softmax_scale=cfg.get("scale"),
              backend=cfg.get("backend", "auto"))
    opts = dict(cfg.get("opts", {}))
    via = cfg.get("via", "fn")
    name = {"token_ring_direct": "token_ring", "token_ring_ring": "token_ring"}.get(strategy, strategy)
    if strategy == "token_ring_direct":
        opts.setdefault("route", "direct")
    if strategy == "token_ring_ring":
        opts.setdefault("route", "ring")
    if via == "dispatch":
        return seqpar.attention(q, k, v, strategy=name, **kw, **opts)
    fn = {"ulysses": seqpar.ulysses_attention, "usp": seqpar.usp_attention,
          "allgather": seqpar.allgather_attention, "token_ring": seqpar.token_ring_attention,
          "ring": seqpar.ring_attention}[name]
    return fn(q, k, v, **kw, **opts)


_GROUPS = {}


def _group(ranks):
    # every world rank calls new_group with the same ranks (collective in torch.distributed)
    if ranks not in _GROUPS:
        _GROUPS[ranks] = dist.new_group(list(ranks))
    return _GROUPS[ranks]


def _desc(cfg):
    keys = ["strategy", "P", "N", "B", "H", "Hkv", "D", "scheme", "causal", "opts", "dtype", "backend",
            "noncontig", "grads", "group", "via", "scale"]
    return ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


def run_case(cfg):
    """Run one case on this rank; returns a list of failure strings (empty = pass)."""
    B, N, H, Hkv, D = cfg.get("B", 2), cfg["N"], cfg["H"], cfg["Hkv"], cfg.get("D", 8)
    dtname = cfg.get("dtype", "float64")
    dtype = DT[dtname]
    causal, scale = cfg.get("causal", True), cfg.get("scale")
    gr = cfg.get("group")
    if gr is not None:
        g = _group(tuple(gr))
        if dist.get_rank() not in gr:
            return []
        P, r = dist.get_world_size(g), dist.get_rank(g)
        layout = seqpar.SeqLayout(N, group=g, scheme=cfg["scheme"])
    else:
        P, r = dist.get_world_size(), dist.get_rank()
        layout = seqpar.SeqLayout(N, scheme=cfg["scheme"])
    gen = torch.Generator().manual_seed(cfg.get("seed", 1234))
    Q = torch.randn(B, N, H, D, generator=gen, dtype=torch.float64)
    K = torch.randn(B, N, Hkv, D, generator=gen, dtype=torch.float64)
    V = torch.randn(B, N, Hkv, D, generator=gen, dtype=torch.float64)
    DO = torch.randn(B, N, H, D, generator=gen, dtype=torch.float64)
    Q, K, V = (t.to(dtype).double() for t in (Q, K, V))  # reference sees the rounded inputs
    pos = my_positions(N, P, r, cfg["scheme"])

    def local(T):
        t = T.index_select(1, pos).to(dtype)
        if cfg.get("noncontig"):
            t = t.transpose(1, 2).contiguous().transpose(1, 2)  # bshd view of bhsd storage
            assert not t.is_contiguous()
        return t

    need = cfg.get("grads", (True, True, True))
    q, k, v = (local(T).requires_grad_(n) for T, n in zip((Q, K, V), need))
    do = DO.index_select(1, pos).to(dtype)
    out = call(cfg["strategy"], q, k, v, layout, cfg)
    if any(need):
        out.backward(do)
    # ---- all collectives done; now check ----
    fails = []
    ref = dense(Q, K, V, DO, causal, scale)
    tol = cfg.get("tol", TOL[dtname])

    def cmp(name, got, want):
        if got is None:
            fails.append(f"rank {r}: {name} is None")
            return
        if got.dtype != dtype:
            fails.append(f"rank {r}: {name} dtype {got.dtype}, expected {dtype}")
        if tuple(got.shape) != tuple(want.shape):
            fails.append(f"rank {r}: {name} shape {tuple(got.shape)}, expected {tuple(want.shape)}")
            return
        err = (got.double() - want).abs().max().item() if want.numel() else 0.0
        rel = err / max(1.0, want.abs().max().item()) if dtname != "float64" else err
        if not rel <= tol:
            fails.append(f"rank {r}: {name} max err {err:.3e} (tol {tol:g})")

    cmp("out", out, ref[0].index_select(1, pos))
    for name, t, n, R in zip("qkv", (q, k, v), need, ref[1:]):
        if n:
            cmp(f"d{name}", t.grad, R.index_select(1, pos))
        elif t.grad is not None:
            fails.append(f"rank {r}: d{name} set although {name} does not require grad")
    if not any(need) and out.requires_grad:
        fails.append(f"rank {r}: output requires grad though no input does")
    return [f"[{_desc(cfg)}] {m}" for m in fails]


def _cases_worker(cfgs):
    fails = []
    for cfg in cfgs:
        fails += run_case(cfg)
    return fails


def run_cases(P, cfgs, timeout=None):
    res = world(P).run(_cases_worker, cfgs, return_exceptions=True, timeout=timeout or TIMEOUT)
    msgs = []
    for r, x in enumerate(res):
        if isinstance(x, BaseException):
            msgs.append(f"rank {r} raised {type(x).__name__}: {x}")
        else:
            msgs += x
    assert not msgs, "\n".join(msgs)


def heads_for(strategy, P, i=0):
    """(H, Hkv) that `strategy` can serve on P ranks, varied by i."""
    if strategy in ("ulysses",):
        opts = {2: [(4, 2), (4, 1), (8, 4)], 3: [(6, 3), (3, 1), (12, 6)],
                4: [(8, 8), (8, 2), (4, 1), (8, 4)]}[P]
    elif strategy == "usp":
        opts = {2: [(4, 2), (2, 1), (4, 4)], 3: [(6, 3), (3, 1), (3, 3)],
                4: [(4, 2), (8, 1), (4, 4)]}[P]
    else:
        opts = [(4, 2), (3, 1), (6, 3), (4, 4)]
    return opts[i % len(opts)]


def usp_opts(P):
    return {"ulysses_size": 2 if P % 2 == 0 else P}


# ------------------------------------------------------------------------------------
# 1. core sweep: every strategy x P x scheme, N = P, P+1, prime, odd; causal and not
# ------------------------------------------------------------------------------------

@pytest.mark.parametrize("P", [2, 3, 4])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("strategy", STRATS)
def test_sweep_matches_dense(strategy, scheme, P):
    cfgs = []
    for i, (N, causal) in enumerate([(P, True), (P + 1, True), (13, True), (11, False), (2 * P + 1, True)]):
        H, Hkv = heads_for(strategy, P, i)
        cfg = dict(strategy=strategy, P=P, N=N, H=H, Hkv=Hkv, scheme=scheme, causal=causal,
                   B=1 + i % 3, D=4 + 2 * (i % 2), seed=100 * P + i)
        if strategy == "usp":
            cfg["opts"] = usp_opts(P)
        if i == 3:
            cfg["scale"] = 0.37
        cfgs.append(cfg)
    run_cases(P, cfgs)


# ------------------------------------------------------------------------------------
# 2. GQA / MQA for Ulysses (H_kv > P, = P, < P replicated)
# ------------------------------------------------------------------------------------

@pytest.mark.parametrize("P,H,Hkv", [(4, 8, 8), (4, 16, 8), (4, 8, 4), (4, 8, 2), (4, 8, 1), (4, 4, 1),
                                     (2, 8, 8), (2, 2, 1), (3, 6, 6), (3, 3, 1), (3, 9, 3)])
def test_ulysses_gqa(P, H, Hkv):
    cfgs = [dict(strategy="ulysses", P=P, N=n, H=H, Hkv=Hkv, scheme=s, causal=c, B=2, seed=n)
            for n, s, c in [(4 * P + 1, "zigzag", True), (7, "stripe", False), (P, "contiguous", True)]]
    run_cases(P, cfgs)


def _error_worker(strategy, N, H, Hkv, opts):
    layout = seqpar.SeqLayout(N)
    n = layout.local_len
    q = torch.randn(1, n, H, 4, dtype=torch.float64)
    k = torch.randn(1, n, Hkv, 4, dtype=torch.float64)
    try:
        call(strategy, q, k, k.clone(), layout, {"opts": opts})
    except ValueError as e:
        return "ValueError: " + str(e)
    except Exception as e:  # noqa: BLE001
        return f"WRONG {type(e).__name__}: {e}"
    return "NO ERROR"


@pytest.mark.parametrize("P,strategy,H,Hkv,opts", [
    (4, "ulysses", 12, 3, {}),        # H % P == 0 but H_kv neither divides nor is divided by P
    (3, "ulysses", 6, 2, {}),
    (4, "ulysses", 6, 2, {}),         # H not divisible by P
    (3, "ulysses", 4, 4, {}),
    (4, "usp", 6, 3, {"ulysses_size": 4}),
    (4, "usp", 12, 3, {"ulysses_size": 2}),
    (4, "usp", 4, 2, {"ulysses_size": 3}),  # U does not divide P
    (4, "usp", 4, 2, {"ulysses_size": 0}),
])
def test_unservable_raises_valueerror_naming_alternatives(P, strategy, H, Hkv, opts):
    res = world(P).run(_error_worker, strategy, 2 * P + 1, H, Hkv, opts, return_exceptions=True, timeout=TIMEOUT)
    for r, msg in enumerate(res):
        assert isinstance(msg, str) and msg.startswith("ValueError"), f"rank {r}: {msg!r}"
    low = res[0].lower()
    if strategy == "ulysses":
        assert "head" in low, f"message must name the constraint: {res[0]}"
        assert "ring" in low, f"message must name the strategies that can serve it: {res[0]}"
    elif P % opts["ulysses_size"] if opts["ulysses_size"] else True:
        assert "ulysses_size" in low, res[0]
    else:
        assert "head" in low, f"message must name the constraint: {res[0]}"


# ------------------------------------------------------------------------------------
# 3. USP splits, incl. P=4 U=2 with stripe and zigzag uneven, through both entry points
# ------------------------------------------------------------------------------------

@pytest.mark.parametrize("P,U", [(2, 1), (2, 2), (3, 1), (3, 3), (4, 1), (4, 2), (4, 4)])
def test_usp_splits(P, U):
    cfgs = []
    for i, (scheme, N) in enumerate([("stripe", 4 * P + 3), ("zigzag", 4 * P + 1), ("zigzag", P + 1),
                                     ("contiguous", 13), ("stripe", P)]):
        for H, Hkv in [(2 * U, U), (2 * U, 1), (4 * U, 2 * U)]:
            cfgs.append(dict(strategy="usp", P=P, N=N, H=H, Hkv=Hkv, scheme=scheme, causal=i != 3, B=2,
                             opts={"ulysses_size": U}, seed=N + H + Hkv, via="dispatch" if i % 2 else "fn"))
    run_cases(P, cfgs)


# ------------------------------------------------------------------------------------
# 4. allgather kv_head_chunk (dividing and not dividing H_kv, larger than H_kv)
# ------------------------------------------------------------------------------------

@pytest.mark.parametrize("P", [2, 3, 4])
@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_allgather_head_chunks(P, chunk):
    cfgs = []
    for i, (H, Hkv) in enumerate([(4, 4), (8, 4), (6, 3), (4, 2), (4, 1)]):
        cfgs.append(dict(strategy="allgather", P=P, N=[P, 13, 2 * P + 1, 11, P + 1][i], H=H, Hkv=Hkv,
                         scheme=SCHEMES[i % 3], causal=i != 3, B=2, opts={"kv_head_chunk": chunk},
                         seed=7 * i + chunk, via="dispatch" if i == 1 else "fn"))
    run_cases(P, cfgs)


# ------------------------------------------------------------------------------------
# 5. token_ring both routes, causal contiguous (many empty messages)
# ------------------------------------------------------------------------------------

@pytest.mark.parametrize("P", [2, 3, 4])
@pytest.mark.parametrize("route", ["direct", "ring"])
def test_token_ring_routes(P, route):
    cfgs = []
    for i, (scheme, N, causal) in enumerate([("contiguous", P, True), ("contiguous", P + 1, True),
                                             ("contiguous", 17, True), ("contiguous", 9, False),
                                             ("zigzag", 15, True), ("stripe", 10, True)]):
        H, Hkv = [(4, 2), (2, 1), (3, 3), (4, 4)][i % 4]
        cfgs.append(dict(strategy="token_ring_" + route, P=P, N=N, H=H, Hkv=Hkv, scheme=scheme, causal=causal,
                         B=1 + i % 2, seed=i, via="dispatch" if i == 2 else "fn"))
    run_cases(P, cfgs)


# ------------------------------------------------------------------------------------
# 6. non-contiguous inputs, partial requires_grad, bf16, backends
# ------------------------------------------------------------------------------------

@pytest.mark.parametrize("P", [2, 3])
def test_noncontiguous_inputs(P):
    cfgs = []
    for i, s in enumerate(STRATS):
        H, Hkv = heads_for(s, P)
        cfgs.append(dict(strategy=s, P=P, N=2 * P + 1, H=H, Hkv=Hkv, scheme=SCHEMES[i % 3], noncontig=True,
                         opts=usp_opts(P) if s == "usp" else {}, seed=i))
    run_cases(P, cfgs)


@pytest.mark.parametrize("strategy", STRATS)
def test_partial_requires_grad(strategy):
    P = 3
    H, Hkv = heads_for(strategy, P)
    cfgs = [dict(strategy=strategy, P=P, N=10, H=H, Hkv=Hkv, scheme=s, grads=g, seed=j,
                 opts=usp_opts(P) if strategy == "usp" else {})
            for j, (g, s) in enumerate([((True, False, False), "zigzag"), ((False, True, False), "stripe"),
                                        ((False, False, True), "contiguous"), ((False, True, True), "zigzag"),
                                        ((True, False, True), "stripe"), ((False, False, False), "contiguous")])]
    run_cases(P, cfgs)


@pytest.mark.parametrize("P", [2, 4])
def test_bf16_and_fp32_backends(P):
    cfgs = []
    for i, s in enumerate(STRATS):
        H, Hkv = heads_for(s, P, i)
        o = usp_opts(P) if s == "usp" else {}
        cfgs.append(dict(strategy=s, P=P, N=4 * P + 3, H=H, Hkv=Hkv, D=16, scheme=SCHEMES[i % 3], dtype="bfloat16",
                         opts=o, seed=i))
        cfgs.append(dict(strategy=s, P=P, N=4 * P + 1, H=H, Hkv=Hkv, D=16, scheme=SCHEMES[(i + 1) % 3],
                         dtype="float32", backend="sdpa", opts=o, seed=i))
        cfgs.append(dict(strategy=s, P=P, N=2 * P + 1, H=H, Hkv=Hkv, scheme=SCHEMES[(i + 2) % 3],
                         backend="torch", opts=o, seed=i))
    run_cases(P, cfgs)


# ------------------------------------------------------------------------------------
# 7. state leaks: many strategies / shapes / U back to back in one call and across calls
# ------------------------------------------------------------------------------------

def test_back_to_back_same_world():
    P = 4
    seq = [
        dict(strategy="usp", N=13, H=4, Hkv=2, scheme="zigzag", opts={"ulysses_size": 2}),
        dict(strategy="usp", N=17, H=8, Hkv=4, scheme="stripe", opts={"ulysses_size": 4}),
        dict(strategy="ulysses", N=9, H=4, Hkv=1, scheme="contiguous"),
        dict(strategy="usp", N=11, H=4, Hkv=2, scheme="contiguous", opts={"ulysses_size": 1}),
        dict(strategy="usp", N=12, H=2, Hkv=2, scheme="zigzag", opts={"ulysses_size": 2}, causal=False),
        dict(strategy="allgather", N=7, H=6, Hkv=3, scheme="stripe", opts={"kv_head_chunk": 2}),
        dict(strategy="token_ring_direct", N=5, H=2, Hkv=1, scheme="contiguous"),
        dict(strategy="token_ring_ring", N=14, H=4, Hkv=2, scheme="zigzag", B=3),
        dict(strategy="ulysses", N=21, H=8, Hkv=8, scheme="stripe", D=6),
        dict(strategy="usp", N=13, H=4, Hkv=2, scheme="zigzag", opts={"ulysses_size": 2}, dtype="bfloat16"),
        dict(strategy="usp", N=6, H=4, Hkv=1, scheme="stripe", opts={"ulysses_size": 4}),
    ]
    for i, c in enumerate(seq):
        c.update(P=P, seed=i)
    run_cases(P, seq)
    run_cases(P, list(reversed(seq)))  # second call: cached groups / buffers reused with other shapes


# ------------------------------------------------------------------------------------
# 8. sub-group process groups as layout.group
# ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ranks", [(0, 1), (2, 3), (1, 2, 3), (0, 2)])
def test_subgroup_layouts(ranks):
    P = len(ranks)
    cfgs = []
    for i, s in enumerate(STRATS):
        H, Hkv = heads_for(s, P, i)
        cfgs.append(dict(strategy=s, P=P, N=3 * P + 1, H=H, Hkv=Hkv, scheme=SCHEMES[i % 3], group=ranks,
                         opts=usp_opts(P) if s == "usp" else {}, seed=i))
    if P == 2:
        cfgs.append(dict(strategy="usp", P=P, N=7, H=4, Hkv=2, scheme="zigzag", group=ranks,
                         opts={"ulysses_size": 1}))
    else:
        cfgs.append(dict(strategy="usp", P=P, N=7, H=3, Hkv=1, scheme="stripe", group=ranks,
                         opts={"ulysses_size": 1}))
    cfgs.append(dict(strategy="allgather", P=P, N=P, H=4, Hkv=2, scheme="zigzag", group=ranks,
                     opts={"kv_head_chunk": 1}, via="dispatch"))
    run_cases(4, cfgs, timeout=TIMEOUT)


def test_usp_subgroup_then_world_then_other_subgroup():
    cfgs = [
        dict(strategy="usp", P=2, N=9, H=4, Hkv=2, scheme="stripe", group=(0, 1), opts={"ulysses_size": 2}),
        dict(strategy="usp", P=4, N=13, H=4, Hkv=2, scheme="zigzag", opts={"ulysses_size": 2}),
        dict(strategy="usp", P=2, N=9, H=4, Hkv=2, scheme="zigzag", group=(2, 3), opts={"ulysses_size": 2}),
        dict(strategy="usp", P=3, N=10, H=3, Hkv=3, scheme="zigzag", group=(1, 2, 3), opts={"ulysses_size": 3}),
        dict(strategy="usp", P=4, N=13, H=4, Hkv=4, scheme="stripe", opts={"ulysses_size": 4}),
        dict(strategy="ulysses", P=2, N=5, H=2, Hkv=1, scheme="contiguous", group=(1, 3)),
    ]
    run_cases(4, cfgs, timeout=TIMEOUT)


def test_usp_in_subgroup_keeps_later_new_group_collective_in_sync():
    # torch.distributed requires every rank of the default group to call new_group, in the
    # same order; USP inside a sub-group must not create groups on the members only, or the
    # user's next dist.new_group (here [0, 2], created by all 4 ranks) hangs.
    cfgs = [
        dict(strategy="usp", P=2, N=9, H=4, Hkv=2, scheme="stripe", group=(0, 1), opts={"ulysses_size": 2}),
        dict(strategy="ring", P=2, N=7, H=4, Hkv=2, scheme="contiguous", group=(0, 2)),
    ]
    run_cases(4, cfgs, timeout=TIMEOUT)


# ------------------------------------------------------------------------------------
# 9. bytes: Ulysses forward volume, derived here
# ------------------------------------------------------------------------------------

def _bytes_worker(B, N, H, Hkv, D, dtname, strategy):
    layout = seqpar.SeqLayout(N)
    n = layout.local_len
    dtype = DT[dtname]
    q = torch.randn(B, n, H, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, n, Hkv, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, n, Hkv, D, dtype=dtype, requires_grad=True)
    with seqpar.comm.track() as s:
        if strategy == "dispatch":
            seqpar.attention(q, k, v, layout=layout, causal=True, strategy="ulysses")
        else:
            seqpar.ulysses_attention(q, k, v, layout=layout, causal=True)
    return s.bytes_sent("ulysses"), s.bytes_received("ulysses"), s.bytes_sent("ulysses.forward"), s.bytes_sent()


@pytest.mark.parametrize("P,B,H,Hkv,D,dt", [(2, 2, 4, 2, 8, "float64"), (4, 1, 8, 4, 6, "float32"),
                                             (4, 3, 8, 8, 4, "bfloat16"), (3, 2, 6, 3, 8, "float64"),
                                             (4, 2, 8, 1, 8, "float64"), (4, 2, 4, 2, 8, "float32")])
@pytest.mark.parametrize("entry", ["fn", "dispatch"])
def test_ulysses_forward_bytes(P, B, H, Hkv, D, dt, entry):
    N = 4 * P
    n = N // P
    es = torch.empty(0, dtype=DT[dt]).element_size()
    if Hkv % P == 0:
        elems = B * n * D * (2 * H + 2 * Hkv) * (P - 1) / P
    else:  # P % Hkv == 0: each other rank needs exactly one KV head of k and of v
        elems = B * n * D * (2 * H * (P - 1) / P + 2 * (P - 1))
    expected = int(round(elems)) * es
    res = world(P).run(_bytes_worker, B, N, H, Hkv, D, dt, entry, return_exceptions=True, timeout=TIMEOUT)
    for r, x in enumerate(res):
        assert not isinstance(x, BaseException), f"rank {r}: {x!r}"
        sent, recv, fwd, total = x
        assert sent == expected, f"rank {r}: ulysses bytes_sent {sent}, analytic {expected} (all ops {total})"
        assert recv == expected, f"rank {r}: ulysses bytes_received {recv}, analytic {expected}"
        assert fwd == expected, f"rank {r}: ulysses.forward bytes {fwd}, expected {expected} (all ops {total})"
