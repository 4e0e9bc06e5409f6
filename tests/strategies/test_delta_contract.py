"""Contract test of `seqpar.delta_attention` (gated delta rule), written apart from the
implementation, from the public contract only:

    out = seqpar.delta_attention(q, k, v, beta, *, layout=None, decay=None, scale=None,
                                 method="auto", backend="auto")

Per head, from a zero state `S` `[Dk, Dv]` (restarted at every document start):
`S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t`, `o_t = scale q_t S_t`.

The reference below is this file's own token-by-token float64 recurrence (checked against a
closed-form WY solve and hand-computed cases); nothing of seqpar's kernels or references is
used. Multi-rank cases run on real gloo worlds (`seqpar.testing.world`): each rank gets its
contiguous shard, calls `seqpar.delta_attention`, backpropagates its shard of dO, and the
outputs and gradients are all-gathered (a per-head decay's gradients are per-rank shares,
summed with all_reduce) and compared with the reference on the global sequence.
"""
import math

import pytest
import torch

import seqpar
from seqpar.testing import world

METHODS = ("ring", "allgather", "allscan", "auto")
DECAYS = ("none", "head", "token")
B, H, DK, DV = 2, 2, 5, 3  # Dk != Dv: a transposed state cannot pass


# -- the reference ------------------------------------------------------------------------


def _log_decay(decay, b, n, h, like):
    if decay is None:
        return like.new_zeros(b, n, h)
    if decay.dim() == 1:
        return decay.expand(b, n, h)
    return decay


def reference_delta(q, k, v, beta, decay=None, scale=None, documents=None):
    """Token-by-token gated delta rule. q, k `[B, N, H, Dk]`, v `[B, N, H, Dv]`, beta
    `[B, N, H]`, decay None / `[H]` / `[B, N, H]` (log space), documents `(0, ..., N)`."""
    b, n, h, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    g = _log_decay(decay, b, n, h, q)
    starts = {0} if documents is None else set(documents[:-1])
    state = q.new_zeros(b, h, dk, dv)
    outs = []
    for t in range(n):
        if t in starts:
            state = q.new_zeros(b, h, dk, dv)
        kt, vt = k[:, t], v[:, t]  # [B, H, Dk], [B, H, Dv]
        bt = beta[:, t][..., None, None]
        at = torch.exp(g[:, t])[..., None, None]
        k_s = torch.einsum("bhk,bhkv->bhv", kt, state)  # k_t S_{t-1}
        # exp(g)(I - beta k^T k) S + beta k^T v
        state = at * (state - bt * kt[..., :, None] * k_s[..., None, :]) + bt * kt[..., :, None] * vt[..., None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outs, 1)


def closed_form_delta(q, k, v, beta, decay=None, scale=None, documents=None):
    """The same rule solved at once (the WY form): with `u_t = beta_t (v_t - exp(g_t) k_t S_{t-1})`,
    `S_t = sum_{s<=t} exp(G_t - G_s) k_s^T u_s`, so `(I + diag(beta) tril(K K^T * D, -1)) U = diag(beta) V`
    and `O = scale (Q K^T * D * causal) U` with `D_ts = exp(G_t - G_s)` inside a document."""
    b, n, h, dk = q.shape
    scale = dk ** -0.5 if scale is None else scale
    g = _log_decay(decay, b, n, h, q)
    bounds = [0, n] if documents is None else list(documents)
    doc = torch.bucketize(torch.arange(n), torch.tensor(bounds[1:-1], dtype=torch.long), right=True)
    same = doc[:, None] == doc[None, :]
    t_idx = torch.arange(n)
    strict = same & (t_idx[None, :] < t_idx[:, None])
    incl = same & (t_idx[None, :] <= t_idx[:, None])
    out = []
    for bi in range(b):
        heads = []
        for hi in range(h):
            G = torch.cumsum(g[bi, :, hi], 0)
            diff = G[:, None] - G[None, :]
            D = torch.where(incl, torch.exp(torch.where(incl, diff, torch.zeros_like(diff))), torch.zeros_like(diff))
            K, Q, V, bet = k[bi, :, hi], q[bi, :, hi], v[bi, :, hi], beta[bi, :, hi]
            A = torch.eye(n, dtype=q.dtype) + bet[:, None] * (K @ K.T * D * strict)
            U = torch.linalg.solve_triangular(A, bet[:, None] * V, upper=False)
            heads.append(scale * (Q @ K.T * D) @ U)
        out.append(torch.stack(heads, 1))
    return torch.stack(out, 0)


def global_inputs(seed, n, decay_kind, b=B, h=H, dk=DK, dv=DV):
    """q, k (L2-normalised rows), v, beta in (0, 1), decay (None, [H] or [B, N, H]; log space) and dO, float64."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, dk, generator=gen, dtype=torch.float64)
    k = torch.randn(b, n, h, dk, generator=gen, dtype=torch.float64)
    k = k / k.norm(dim=-1, keepdim=True)
    v = torch.randn(b, n, h, dv, generator=gen, dtype=torch.float64)
    beta = torch.sigmoid(torch.randn(b, n, h, generator=gen, dtype=torch.float64))
    do = torch.randn(b, n, h, dv, generator=gen, dtype=torch.float64)
    if decay_kind == "none":
        decay = None
    elif decay_kind == "head":
        decay = torch.log(0.5 + 0.5 * torch.rand(h, generator=gen, dtype=torch.float64))
    elif decay_kind == "token":
        decay = torch.log(0.2 + 0.8 * torch.rand(b, n, h, generator=gen, dtype=torch.float64))
    else:
        raise ValueError(decay_kind)
    return q, k, v, beta, decay, do


def reference_grads(q, k, v, beta, decay, do, scale=None, documents=None, fn=reference_delta):
    """out and the gradients of <out, do> with respect to q, k, v, beta and decay (if a tensor)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, beta)]
    d = None if decay is None else decay.detach().clone().requires_grad_()
    out = fn(*leaves, decay=d, scale=scale, documents=documents)
    out.backward(do)
    res = {"out": out.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad,
           "dbeta": leaves[3].grad}
    if d is not None:
        res["ddecay"] = d.grad
    return res


def rel_err(got, ref):
    ref = ref.double()
    if got is None:
        return math.inf
    if got.shape != ref.shape:
        return math.inf
    denom = ref.abs().max().item()
    return (got.double() - ref).abs().max().item() / (denom if denom > 0 else 1.0)


# -- checks of the reference itself (no seqpar involved) ------------------------------------


def test_reference_by_hand():
    # B = H = 1, Dk = 2, Dv = 1, scale 1
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64).view(1, 2, 1, 2)
    v = torch.tensor([2.0, 4.0], dtype=torch.float64).view(1, 2, 1, 1)
    q = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64).view(1, 2, 1, 2)
    beta = torch.tensor([0.5, 0.5], dtype=torch.float64).view(1, 2, 1)
    g = torch.log(torch.tensor([1.0, 0.5], dtype=torch.float64)).view(1, 2, 1)
    # S1 = 0.5 e1^T 2 = [[1], [0]];  o1 = 1
    # S2 = 0.5 (S1 - 0.5 e1^T e1 S1) + 0.5 e1^T 4 = [[0.25 + 2], [0]];  o2 = [1, 1] S2 = 2.25
    out = reference_delta(q, k, v, beta, decay=g, scale=1.0)
    torch.testing.assert_close(out.flatten(), torch.tensor([1.0, 2.25], dtype=torch.float64), rtol=0, atol=1e-15)
    # a document starting at token 1: S restarts, S2 = 0.5 e1^T 4; o2 = 2
    out = reference_delta(q, k, v, beta, decay=g, scale=1.0, documents=(0, 1, 2))
    torch.testing.assert_close(out.flatten(), torch.tensor([1.0, 2.0], dtype=torch.float64), rtol=0, atol=1e-15)


def test_reference_orthonormal_keys_store_and_overwrite():
    # beta = 1, no decay, orthonormal keys: the state is a key-value memory; querying key j
    # after step t reads v_j if j <= t, else 0. Writing key 0 again overwrites its value.
    n, dk, dv = 4, 6, 3
    basis = torch.linalg.qr(torch.randn(dk, dk, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0]
    keys = basis[:n].clone()
    keys[3] = keys[0]  # step 3 overwrites key 0
    v = torch.randn(1, n, 1, dv, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    beta = torch.ones(1, n, 1, dtype=torch.float64)
    k = keys.view(1, n, 1, dk)
    for j in range(3):
        q = basis[j].expand(n, dk).reshape(1, n, 1, dk)
        out = reference_delta(q, k, v, beta, scale=1.0)[0, :, 0]
        for t in range(n):
            if j == 0 and t == 3:
                expected = v[0, 3, 0]
            elif j <= t:
                expected = v[0, j, 0]
            else:
                expected = torch.zeros(dv, dtype=torch.float64)
            torch.testing.assert_close(out[t], expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("decay_kind", DECAYS)
@pytest.mark.parametrize("documents", [None, (0, 1, 6, 7, 23)])
def test_reference_matches_closed_form(decay_kind, documents):
    q, k, v, beta, decay, do = global_inputs(11, 23, decay_kind)
    rec = reference_grads(q, k, v, beta, decay, do, scale=0.7, documents=documents)
    wy = reference_grads(q, k, v, beta, decay, do, scale=0.7, documents=documents, fn=closed_form_delta)
    assert rec.keys() == wy.keys()
    for name in rec:
        assert rel_err(rec[name], wy[name]) < 1e-12, name
    # documents: each document alone from a zero state
    if documents is not None:
        for s, e in zip(documents[:-1], documents[1:]):
            piece = reference_delta(q[:, s:e], k[:, s:e], v[:, s:e], beta[:, s:e],
                                    decay=None if decay is None else (decay if decay.dim() == 1 else decay[:, s:e]),
                                    scale=0.7)
            assert rel_err(rec["out"][:, s:e], piece) < 1e-14


# -- rank functions -----------------------------------------------------------------------


def _gather(x, layout):
    from seqpar.layout import gather_global

    return None if x is None else gather_global(x.detach().contiguous(), layout, 1)


def _run_one(layout, inputs, method, dtype, scale, documents):
    """This rank's call; out and gradients gathered to global tensors (float64 for comparing)."""
    import torch.distributed as dist

    q, k, v, beta, decay, do = inputs
    leaves = [layout.shard(t).to(dtype).clone().requires_grad_() for t in (q, k, v, beta)]
    if decay is None:
        d = None
    elif decay.dim() == 1:
        d = decay.to(dtype).clone().requires_grad_()
    else:
        d = layout.shard(decay).to(dtype).clone().requires_grad_()
    out = seqpar.delta_attention(*leaves, layout=layout, decay=d, scale=scale, method=method)
    problems = []
    if out.dtype != dtype:
        problems.append(f"out dtype {out.dtype}, expected {dtype}")
    expected_shape = (q.shape[0], layout.local_len, q.shape[2], v.shape[3])
    if tuple(out.shape) != expected_shape:
        problems.append(f"out shape {tuple(out.shape)}, expected {expected_shape}")
    out.backward(layout.shard(do).to(dtype))
    got = {"out": _gather(out, layout)}
    for name, leaf in zip(("dq", "dk", "dv", "dbeta"), leaves):
        if leaf.grad is not None and leaf.grad.dtype != dtype:
            problems.append(f"{name} dtype {leaf.grad.dtype}")
        got[name] = _gather(leaf.grad, layout)
    if d is not None:
        if d.grad is None:
            got["ddecay"] = None
        elif d.dim() == 1:
            share = d.grad.detach().clone()
            if layout.world_size > 1:
                dist.all_reduce(share, group=layout.group)
            got["ddecay"] = share
        else:
            got["ddecay"] = _gather(d.grad, layout)
    return got, problems


def _match(world_size, seq_len, documents, decays, methods, dtype_name, seed):
    """Max relative errors against the float64 reference, by (decay, method, scale)."""
    dtype = getattr(torch, dtype_name)
    layout = seqpar.SeqLayout(seq_len, cu_seqlens=documents)
    assert layout.world_size == world_size
    report = {}
    for di, decay_kind in enumerate(decays):
        inputs = global_inputs(seed + di, seq_len, decay_kind)
        q, k, v, beta, decay, do = inputs
        refs = {}
        for mi, method in enumerate(methods):
            scale = None if (mi + di) % 2 == 0 else 0.6  # the default and an explicit scale
            if scale not in refs:
                refs[scale] = reference_grads(q, k, v, beta, decay, do, scale=scale, documents=documents)
            ref = refs[scale]
            got, problems = _run_one(layout, inputs, method, dtype, scale, documents)
            errs = {name: rel_err(got.get(name), ref[name]) for name in ref}
            extra = sorted(set(got) - set(ref))
            if extra:
                problems.append(f"unexpected gradients {extra}")
            report[(decay_kind, method, scale)] = (errs, problems)
    return report


def _format(report):
    lines = []
    for (decay_kind, method, scale), (errs, problems) in report.items():
        cells = " ".join(f"{n}={e:.2e}" for n, e in errs.items())
        lines.append(f"decay={decay_kind:5s} method={method:9s} scale={scale}: {cells} {'; '.join(problems)}")
    return "\n".join(lines)


def _check_report(report, out_tol, grad_tol):
    bad = []
    for key, (errs, problems) in report.items():
        if problems:
            bad.append((key, problems))
        for name, e in errs.items():
            tol = out_tol if name == "out" else grad_tol
            if not e < tol:
                bad.append((key, f"{name} rel err {e:.3e} >= {tol}"))
    assert not bad, f"{bad}\nall results:\n{_format(report)}"


# -- float64 against the reference: every method, decay form, world size, documents --------

# contiguous splits (torch.tensor_split): 17 / 2 -> 9, 8; 20 / 3 -> 7, 7, 6; 23 / 4 -> 6, 6, 6, 5
CASES = [
    # (world size, seq_len, documents)
    (1, 9, None),
    (1, 9, (0, 1, 5, 9)),  # a one-token document first
    (2, 17, None),
    (2, 17, (0, 5, 12, 13, 17)),  # [5, 12) across both ranks, a one-token document
    (3, 20, None),
    # one-token [2, 3); [3, 7) ends at rank 0's end; [7, 19) starts at rank 1's first token and
    # crosses into rank 2; a one-token last document
    (3, 20, (0, 2, 3, 7, 19, 20)),
    (4, 23, None),
    # one-token [0, 1); a one-token document on rank 1's first token; [7, 23) across ranks 1-3
    (4, 23, (0, 1, 6, 7, 23)),
    # [0, 17) across ranks 0-2, ending inside rank 2; a document starting mid rank 2 into rank 3
    (4, 23, (0, 17, 23)),
]


@pytest.mark.parametrize("world_size, seq_len, documents", CASES)
def test_float64_matches_recurrence(world_size, seq_len, documents):
    results = world(world_size).run(_match, world_size, seq_len, documents, DECAYS, METHODS, "float64",
                                    seed=100 + seq_len, timeout=120)
    for rank in range(world_size):
        _check_report(results[rank], 1e-10, 1e-10)


def test_float32_close_to_float64_reference():
    # N = 64 over 2 ranks, every method, a per-token and a per-head decay
    report = world(2).run(_match, 2, 64, None, ("token", "head"), METHODS, "float32", seed=7, timeout=120)[0]
    print("\nfloat32 vs float64 reference (P=2, N=64):\n" + _format(report))
    _check_report(report, 1e-4, 1e-3)


def test_float32_with_documents():
    report = world(2).run(_match, 2, 64, (0, 20, 21, 50, 64), ("token",), METHODS, "float32", seed=8,
                          timeout=120)[0]
    print("\nfloat32 vs float64 reference with documents (P=2, N=64):\n" + _format(report))
    _check_report(report, 1e-4, 1e-3)


# -- bad input: a clear error on every rank that names the argument ------------------------


def _call_with(kind):
    layout = seqpar.SeqLayout(12, scheme="zigzag" if kind == "zigzag" else "contiguous")
    n = layout.local_len
    gen = torch.Generator().manual_seed(layout.rank)
    q = torch.randn(1, n, 2, 4, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(1, n, 2, 4, generator=gen), dim=-1)
    v = torch.randn(1, n, 2, 3, generator=gen)
    beta = torch.sigmoid(torch.randn(1, n, 2, generator=gen))
    decay = None
    if kind == "beta_shape":
        beta = torch.sigmoid(torch.randn(1, n, 3, generator=gen))
    elif kind == "beta_shape_one_rank":
        if layout.rank == 1:  # [B, n, H + 1] on rank 1 only
            beta = torch.sigmoid(torch.randn(1, n, 3, generator=gen))
    elif kind == "positive_head":
        decay = torch.tensor([-0.5, 0.5])
    elif kind == "positive_token_one_rank":
        decay = torch.full((1, n, 2), -0.5)
        if layout.rank == 1:
            decay[0, -1, 0] = 0.5
    elif kind == "decay_channel_shape":
        decay = torch.full((1, n, 2, 4), -0.5)
    elif kind == "method":
        pass
    try:
        seqpar.delta_attention(q, k, v, beta, layout=layout, decay=decay,
                               method="lasp" if kind == "method" else "auto")
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.mark.parametrize("kind, word", [
    ("beta_shape", "beta"),
    ("beta_shape_one_rank", "beta"),
    ("positive_head", "decay"),
    ("positive_token_one_rank", "decay"),
    ("decay_channel_shape", "decay"),
    ("zigzag", "layout"),
    ("method", "method"),
])
def test_bad_input_raises_on_every_rank(kind, word):
    messages = world(2).run(_call_with, kind, timeout=60)
    for rank, message in enumerate(messages):
        assert message is not None, f"{kind}: rank {rank} did not raise"
        assert word in message, f"{kind}: rank {rank}: {word!r} not in {message!r}"


# -- layout=None: the default group, split evenly ------------------------------------------


def _default_layout_equals_explicit():
    layout = seqpar.SeqLayout(16)
    q, k, v, beta, decay, do = global_inputs(5, 16, "token")
    args = [layout.shard(t) for t in (q, k, v, beta)]
    a = seqpar.delta_attention(*args, decay=layout.shard(decay))
    b = seqpar.delta_attention(*args, layout=layout, decay=layout.shard(decay))
    return (a - b).abs().max().item()


def test_layout_none_is_the_default_group():
    assert max(world(2).run(_default_layout_equals_explicit, timeout=60)) == 0.0
