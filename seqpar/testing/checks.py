"""Attention problems, a rank-side check against dense attention, and the tolerance rule.

The rule (one source of truth): float64 must match the float64 dense reference to
`FLOAT64_RTOL` relative to the largest reference value, or, on problems so ill-conditioned
(saturated softmax, gradients that cancel) that PyTorch's own float64 SDPA disagrees with
the reference by more, to `GRAD_FACTOR` times that disagreement; lower precisions
must stay within `FORWARD_FACTOR` (output) / `GRAD_FACTOR` (gradients) of the error that
dense PyTorch attention makes in the same dtype. That dense error is floored at half an ulp
of the dtype (rounding the output costs that much) or `ACCUMULATION_ULPS` ulps of fp32
(the accumulation precision: partial results are merged and summed in fp32), whichever is
larger; on tiny problems dense's own error is a 1-2 ulp coin flip and a pure ratio would
test luck. It is floored as well by the error that rounding the inputs to the dtype
causes by itself (`inputs_*`: float64 math on the rounded q, k, v, dO and sinks), which
no implementation can beat and dense's error only undercuts when its rounding happens to
cancel part of it. Errors are max-abs, relative to the largest reference value.

Rounding a sum costs ulps of the sum of its terms' magnitudes, not of the result: a
gradient that cancels (a softmax saturated on one key, a single token, where dq is exactly
0) carries rounding noise far above its own size. So the floor grows with the
quantity's conditioning `cond_*` (softmax checks: the largest sum of |terms| over the
largest |result|, the terms of the inner sums dO.v included) beyond `COND_BASELINE`, the conditioning of well-conditioned random
problems on which the floor was set (measured 5-18 on the suite's problems). Across P
ranks a row's result is a merge of up to P partial results, each rounded in fp32 before it
is merged (dense rounds once), so that rounding grows with P as well: floor x
max(1, cond x P / COND_BASELINE) (P = 1: as on one device; measured on saturated fp32
problems at P = 3: 2-3 fp32 ulps x cond, dense's own error a lucky draw under the floor).
In float64 the bound is at least `ACCUMULATION_ULPS` ulps of
float64 times cond (a dq cancelled 1e8-fold below its terms carries ~1e-8 of noise). Only cancelled quantities reach it (the saturated ones that
broke the rule before measured cond 54 to 1e12); it widens the floor, never the ratio to
dense.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

FLOAT64_RTOL = 1e-10
FORWARD_FACTOR = 2.0
GRAD_FACTOR = 3.0
ACCUMULATION_ULPS = 8
COND_BASELINE = 16.0
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# How q, k, v (and dO) are laid out in memory when the function under test gets them; the
# values are the problem's either way. "head_dim_stride_2": every other element of a
# buffer twice as wide (the others NaN, so a kernel that reads them cannot pass);
# "dh_transposed": a [B, n, D, H] buffer seen as [B, n, H, D]; "heads_major": a
# [B, H, n, D] buffer; "fused_qkv": slices of one fused projection output
# [B, n, H*D + 2*H_kv*D + 1] (tensors of another length get a buffer of their own);
# "expanded_batch": one stored batch row, expanded (stride 0) to B.
MEMORY_LAYOUTS = ("contiguous", "head_dim_stride_2", "dh_transposed", "heads_major", "fused_qkv", "expanded_batch")


def _check_memory_layout(memory_layout: str) -> None:
    if memory_layout not in MEMORY_LAYOUTS:
        raise ValueError(f"memory_layout: expected one of {MEMORY_LAYOUTS}, got {memory_layout!r}")


def same_batch_rows(tensors, memory_layout: str):
    """`tensors` with every batch row equal to row 0 under "expanded_batch" (an expanded
    view can only hold such values), unchanged otherwise."""
    if memory_layout != "expanded_batch":
        return tensors
    return [None if t is None else t[:1].expand_as(t).contiguous() for t in tensors]


def lay_out(tensors, memory_layout: str):
    """`(leaves, views)`: leaves that require grad, and views of them with the values of
    `tensors` (each `[B, n, H, D]`) in `memory_layout`, differentiable back to the leaves.
    Read gradients with `leaf_grads`."""
    _check_memory_layout(memory_layout)
    tensors = [t.detach() for t in tensors]
    if memory_layout == "expanded_batch":
        leaves = [t[:1].clone().requires_grad_() for t in tensors]
        return leaves, [leaf.expand_as(t) for leaf, t in zip(leaves, tensors)]
    leaves = [t.clone().requires_grad_() for t in tensors]
    if memory_layout == "fused_qkv":
        views = [None] * len(leaves)
        groups: Dict[tuple, list] = {}
        for i, t in enumerate(leaves):
            groups.setdefault(tuple(t.shape[:2]), []).append(i)
        for idx in groups.values():
            first = leaves[idx[0]]
            # one padding column: every slice is a view into a wider row, whatever the group
            pad = first.new_zeros(first.shape[:2] + (1,))
            buf = torch.cat([leaves[i].flatten(2) for i in idx] + [pad], dim=-1)
            start = 0
            for i in idx:
                width = leaves[i].shape[2] * leaves[i].shape[3]
                views[i] = buf[..., start:start + width].unflatten(-1, tuple(leaves[i].shape[2:]))
                start += width
        return leaves, views
    return leaves, [_view(leaf, memory_layout) for leaf in leaves]


def _view(x: torch.Tensor, memory_layout: str) -> torch.Tensor:
    if memory_layout == "head_dim_stride_2":
        return torch.stack([x, torch.full_like(x, float("nan"))], dim=-1)[..., 0]
    if memory_layout == "dh_transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if memory_layout == "heads_major":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x


def lay_out_grad(do: torch.Tensor, memory_layout: str) -> torch.Tensor:
    """The upstream gradient `do` `[B, n, H, D]` in `memory_layout` (fused: a slice of a
    wider buffer of its own; expanded: row 0 expanded)."""
    return lay_out([do], memory_layout)[1][0].detach()


def leaf_grads(leaves, memory_layout: str, batch: int):
    """The gradients of the tensors `lay_out` was given, `[B, n, H, D]` each. An expanded
    leaf holds the batch sum: it is reported as the batch mean in every row, to compare
    with `batch_mean`ed references."""
    if memory_layout != "expanded_batch":
        return [leaf.grad for leaf in leaves]
    return [None if leaf.grad is None else (leaf.grad / batch).expand(batch, *leaf.shape[1:]) for leaf in leaves]


def batch_mean(grads: Dict[str, torch.Tensor], memory_layout: str, names=("dq", "dk", "dv")) -> Dict[str, torch.Tensor]:
    """Reference gradients as `leaf_grads` reports them for `memory_layout`."""
    if memory_layout != "expanded_batch":
        return grads
    return {name: t.mean(0, keepdim=True).expand_as(t) if name in names else t for name, t in grads.items()}


@dataclass(frozen=True)
class AttentionProblem:
    """One attention problem over a local world. Tensors are drawn from `seed`."""

    world_size: int
    seq_len: int
    batch: int = 1
    heads: int = 2
    kv_heads: int = 2
    head_dim: int = 8
    causal: bool = False
    scheme: str = "contiguous"
    dtype: str = "float64"
    logit_scale: float = 1.0  # softmax_scale = logit_scale * head_dim ** -0.5
    seed: int = 0
    memory_layout: str = "contiguous"  # one of MEMORY_LAYOUTS: how q, k, v and dO are stored
    # packed documents: the boundaries [0, l1, ..., seq_len] (SeqLayout's cu_seqlens), or None
    documents: Optional[Tuple[int, ...]] = None
    window: Tuple[int, int] = (-1, -1)  # window_size (left, right); -1: unbounded
    softcap: float = 0.0  # logit softcap (0: none)
    sinks: bool = False  # attention sinks: one logit per query head, drawn from `seed`
    value_dim: Optional[int] = None  # v's head dim (MLA); None: head_dim

    def __post_init__(self):
        _check_memory_layout(self.memory_layout)

    @property
    def v_dim(self) -> int:
        """v's (and the output's) head dim."""
        return self.head_dim if self.value_dim is None else self.value_dim

    @property
    def softmax_scale(self) -> float:
        return self.logit_scale * self.head_dim ** -0.5

    def layout(self):
        """This rank's `SeqLayout` of the problem (collective, like every SeqLayout)."""
        from ..layout import SeqLayout

        return SeqLayout(self.seq_len, scheme=self.scheme, cu_seqlens=self.documents)

    def mask(self) -> Optional[torch.Tensor]:
        """Bool `[N, N]`, True where a query sees a key (documents, window and causal), or
        None when plain causal or full attention says it all."""
        return visibility(self.seq_len, self.causal, self.documents, self.window)

    def mask_options(self) -> Dict:
        """The keywords that give an attention function this problem's window (none when
        unbounded, and no softcap keyword without a softcap, so functions without those
        keywords are still checked)."""
        options = {} if self.window == (-1, -1) else {"window_size": self.window}
        return options if not self.softcap else {**options, "softcap": self.softcap}

    def replace(self, **changes) -> "AttentionProblem":
        return dataclasses.replace(self, **changes)

    def global_tensors(self):
        """q, k, v, d_out in float64, identical on every rank."""
        gen = torch.Generator().manual_seed(self.seed)
        b, n, d = self.batch, self.seq_len, self.head_dim
        q = torch.randn(b, n, self.heads, d, generator=gen, dtype=torch.float64)
        k = torch.randn(b, n, self.kv_heads, d, generator=gen, dtype=torch.float64)
        v = torch.randn(b, n, self.kv_heads, self.v_dim, generator=gen, dtype=torch.float64)
        do = torch.randn(b, n, self.heads, self.v_dim, generator=gen, dtype=torch.float64)
        return tuple(same_batch_rows((q, k, v, do), self.memory_layout))

    def global_sinks(self) -> Optional[torch.Tensor]:
        """The sink logits `[H]` in float64 (None without sinks), identical on every rank."""
        if not self.sinks:
            return None
        gen = torch.Generator().manual_seed(self.seed + 1)
        return torch.randn(self.heads, generator=gen, dtype=torch.float64) * 2


def visibility(seq_len: int, causal: bool, documents: Optional[Sequence[int]] = None,
               window: Tuple[int, int] = (-1, -1)) -> Optional[torch.Tensor]:
    """Bool `[N, N]`: which keys each query sees, by document (`cu_seqlens` boundaries),
    window `(left, right)` and `causal`; None without documents or window (then `causal`
    alone says it)."""
    if documents is None and tuple(window) == (-1, -1):
        return None
    positions = torch.arange(seq_len)
    i, j = positions[:, None], positions[None, :]
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool)
    if documents is not None:
        doc = torch.bucketize(positions, torch.tensor(list(documents[1:-1]), dtype=torch.long), right=True)
        mask &= doc[:, None] == doc[None, :]
    if causal:
        mask &= j <= i
    left, right = window
    if left >= 0:
        mask &= j >= i - left
    if right >= 0:
        mask &= j <= i + right
    return mask


def _dense_grads(q, k, v, do, causal, scale, use_sdpa, mask: Optional[torch.Tensor] = None, softcap: float = 0.0,
                 sinks: Optional[torch.Tensor] = None):
    """Dense attention's output and gradients (`dsinks` too with sinks); `mask` (bool
    `[N, N]`, True = visible) replaces `causal` when given. PyTorch's SDPA takes sinks as one
    more key with a zero value and the sink logit as its bias; it has no softcap: with one,
    the yardstick is the reference math in the same dtype."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if sinks is not None:
        sinks = sinks.detach().clone().requires_grad_()
    if use_sdpa and not softcap and sinks is not None:
        # PyTorch's SDPA with a sink: one more key, of zero value, whose score is the sink
        # logit (an additive bias on that column; zero keys score 0)
        b, n, h, d = q.shape
        n_k = k.shape[1]
        zero = k.new_zeros(b, 1, k.shape[2], d)
        zero_v = v.new_zeros(b, 1, v.shape[2], v.shape[3])
        visible = torch.ones(n, n_k, dtype=torch.bool) if mask is None else mask
        if mask is None and causal:
            visible = visible.tril()
        bias = torch.zeros(h, n, n_k + 1, dtype=q.dtype).masked_fill(
            ~torch.cat([visible, torch.ones(n, 1, dtype=torch.bool)], 1), float("-inf"))
        bias = bias + torch.cat([torch.zeros(h, n, n_k, dtype=q.dtype), sinks[:, None, None].expand(h, n, 1)], 2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), torch.cat([k, zero], 1).transpose(1, 2), torch.cat([v, zero_v], 1).transpose(1, 2),
            attn_mask=bias[None], scale=scale, enable_gqa=q.shape[2] != k.shape[2],
        ).transpose(1, 2)
    elif use_sdpa and not softcap:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal and mask is None,
            attn_mask=mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2],
        ).transpose(1, 2)
    else:
        from ..kernels.reference import dense_attention

        out = dense_attention(q, k, v, causal=causal and mask is None, softmax_scale=scale, mask=mask, softcap=softcap,
                              sinks=sinks)
    out.backward(do)
    grads = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    return grads if sinks is None else {**grads, "dsinks": sinks.grad}


def _check_results(results: Dict[str, Optional[torch.Tensor]], dtype: torch.dtype) -> None:
    """Every output and gradient is present, in the input dtype and finite."""
    for name, t in results.items():
        if t is None:
            raise AssertionError(f"{name} is missing")
        if t.dtype != dtype:
            raise AssertionError(f"{name} has dtype {t.dtype}, expected {dtype}")
        if not torch.isfinite(t).all():
            raise AssertionError(f"{name} has non-finite values")


def conditioning(q, k, v, do, causal: bool, scale: float, ref: Dict[str, torch.Tensor],
                  mask: Optional[torch.Tensor] = None, softcap: float = 0.0,
                  sinks: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """`cond_*` of out, dq, dk, dv (float64): the largest sum of |terms| an element sums
    over the largest |element| (or 1 where the reference is exactly 0), at least 1.
    `mask`: bool `[n_q, n_k]`, True where a query sees a key (instead of `causal`); rows
    that see no key contribute no terms.

    out_i = sum_j P_ij v_j; dv_j = sum_i P_ij dO_i; dq_i = scale sum_j P_ij (dP_ij - delta_i) k_j
    and dk_j alike over i, with dP_ij = dO_i . v_j and delta_i = dO_i . out_i."""
    group = q.shape[2] // k.shape[2]
    qh, kh, vh, doh = (t.transpose(1, 2) for t in (q, k.repeat_interleave(group, 2),
                                                  v.repeat_interleave(group, 2), do))
    scores = scale * qh @ kh.transpose(-1, -2)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif causal:
        n_q, n_k = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(n_q, n_k, dtype=torch.bool).triu(1 + n_k - n_q), float("-inf"))
    if sinks is not None:
        # the sink is one more column of the softmax, with a zero value
        with_sink = torch.cat([scores, sinks[None, :, None, None].expand(*scores.shape[:3], 1)], dim=-1)
        p_all = torch.softmax(with_sink, dim=-1)
        p, p_sink = p_all[..., :-1], p_all[..., -1]
    else:
        p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row that sees no key: no terms
    out = p @ vh
    # dP_ij = dO_i . v_j and delta_i = sum_j P_ij dP_ij are sums themselves: their terms'
    # magnitudes, not their (possibly cancelled) values, are what rounding scales with
    dp_terms = doh.abs() @ vh.abs().transpose(-1, -2)
    weights = p * (dp_terms + (p * dp_terms).sum(-1, keepdim=True))
    terms = {"out": p @ vh.abs(), "dv": p.transpose(-1, -2) @ doh.abs(),
             "dq": scale * weights @ kh.abs(), "dk": scale * weights.transpose(-1, -2) @ qh.abs()}
    if sinks is not None:
        # dsinks_h = -sum over rows of P_sink rowsum(dO * O'): terms of either sign
        rows = p_sink * (doh.abs() * out.abs()).sum(-1)
        terms["dsinks"] = rows.sum((0, 2))[None, None, None, :]
    cond = {}
    for name, mag in terms.items():
        if name in ("dk", "dv"):  # a KV head sums the terms of its group's query heads
            b, _, n, d = mag.shape
            mag = mag.reshape(b, k.shape[2], group, n, d).sum(2)
        largest = ref[name].abs().max().item() or 1.0
        cond[f"cond_{name}"] = max(1.0, mag.max().item() / largest)
    return cond


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item() or 1.0
    return (got.double() - want).abs().max().item() / scale


def check_attention(problem: AttentionProblem, attention_fn: Optional[Callable] = None, **options) -> Dict[str, float]:
    """Run on every rank of a world of `problem.world_size`: compare `attention_fn` with dense.

    `attention_fn(q, k, v, *, layout, causal, softmax_scale, **options)` defaults to
    `seqpar.attention`. Returns, identically on every rank, the relative max error of the
    output and of dq, dk, dv against float64 dense attention (`err_*`), dense PyTorch's own
    error in the same dtype (`dense_*`) and each quantity's conditioning (`cond_*`, see the
    module docstring)."""
    from ..attention import attention
    from ..layout import gather_global

    fn = attention if attention_fn is None else attention_fn
    layout = problem.layout()
    mask = problem.mask()
    dtype = DTYPES[problem.dtype]
    q, k, v, do = problem.global_tensors()
    mem = problem.memory_layout
    leaves, views = lay_out([layout.shard(t).to(dtype) for t in (q, k, v)], mem)
    sinks = problem.global_sinks()
    extra = {} if sinks is None else {"sinks": sinks.to(dtype).requires_grad_()}
    out = fn(*views, layout=layout, causal=problem.causal, softmax_scale=problem.softmax_scale,
             **problem.mask_options(), **extra, **options)
    want_shape = tuple(views[0].shape[:3]) + (problem.v_dim,)
    if out.dtype != dtype or tuple(out.shape) != want_shape:
        raise AssertionError(f"output has dtype {out.dtype} shape {tuple(out.shape)}, expected {dtype} {want_shape}")
    out.backward(lay_out_grad(layout.shard(do).to(dtype), mem))
    dq, dk, dv = leaf_grads(leaves, mem, problem.batch)
    ours = {"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}
    _check_results(ours, dtype)
    ours = {name: gather_global(t, layout, 1) if layout.world_size > 1 else t for name, t in ours.items()}
    if sinks is not None:
        # each rank's sinks.grad is its rows' share: the group's sum is the dense gradient
        dsinks = extra["sinks"].grad.detach().to(torch.float64).clone()
        if layout.world_size > 1:
            torch.distributed.all_reduce(dsinks, group=layout.group)
        ours["dsinks"] = dsinks
    ref = batch_mean(_dense_grads(q, k, v, do, problem.causal, problem.softmax_scale, use_sdpa=False, mask=mask,
                                  softcap=problem.softcap, sinks=sinks), mem)
    report = {f"err_{name}": _rel_err(ours[name], ref[name]) for name in ref}
    # dense PyTorch (SDPA) in the same dtype: its error is the yardstick (in float64, the
    # disagreement of two float64 implementations, which ill-conditioned problems inflate)
    low = [t.to(dtype) for t in (q, k, v, do)]
    dense = batch_mean(_dense_grads(*low, problem.causal, problem.softmax_scale, use_sdpa=True, mask=mask,
                                    softcap=problem.softcap, sinks=None if sinks is None else sinks.to(dtype)), mem)
    report.update({f"dense_{name}": _rel_err(dense[name], ref[name]) for name in ref})
    if sinks is not None or problem.softcap:
        # SDPA takes sinks only through a bias, which sends it to its math kernel, and has no
        # softcap (the yardstick is then the reference math in the dtype); without them its
        # fused kernel runs, as for a model without them: its error on the same q, k, v is
        # PyTorch's own too, and the yardstick is the larger of the two
        plain_ref = _dense_grads(q, k, v, do, problem.causal, problem.softmax_scale, use_sdpa=False, mask=mask)
        plain = _dense_grads(*low, problem.causal, problem.softmax_scale, use_sdpa=True, mask=mask)
        for name in plain:
            report[f"dense_{name}"] = max(report[f"dense_{name}"], _rel_err(plain[name], plain_ref[name]))
    if problem.v_dim != problem.head_dim and dtype != torch.float64 and sinks is None and not problem.softcap:
        # with two head dims PyTorch's SDPA leaves its fused kernels for its math kernel
        # (whose gradients need no rowsum(dO * O)); its fused kernel on the same problem
        # padded to one head dim (exact: zero columns) is dense PyTorch's error too
        width = max(problem.head_dim, problem.v_dim)
        pad = [F.pad(t, (0, width - t.shape[-1])) for t in low]
        fused = _dense_grads(*pad, problem.causal, problem.softmax_scale, use_sdpa=True, mask=mask)
        fused = {"out": fused["out"][..., :problem.v_dim], "dq": fused["dq"][..., :problem.head_dim],
                 "dk": fused["dk"][..., :problem.head_dim], "dv": fused["dv"][..., :problem.v_dim]}
        for name, t in batch_mean(fused, mem).items():
            report[f"dense_{name}"] = max(report[f"dense_{name}"], _rel_err(t, ref[name]))
    if dtype != torch.float64:
        # what rounding the inputs to the dtype costs by itself: float64 math on the rounded
        # q, k, v, dO and sinks (no implementation that takes them can do better)
        rounded = [t.to(dtype).double() for t in (q, k, v, do)]
        exact = _dense_grads(*rounded, problem.causal, problem.softmax_scale, use_sdpa=False, mask=mask,
                             softcap=problem.softcap, sinks=None if sinks is None else sinks.to(dtype).double())
        report.update({f"inputs_{name}": _rel_err(t, ref[name]) for name, t in batch_mean(exact, mem).items()})
    report.update(conditioning(q, k, v, do, problem.causal, problem.softmax_scale, ref, mask=mask,
                               softcap=problem.softcap, sinks=sinks))
    return report


def tolerance_violations(problem, report: Dict[str, float]) -> Dict[str, str]:
    """Which errors of a `check_attention` (or `check_linear_attention`) report break the
    rule; empty when all hold."""
    bad = {}
    dtype = DTYPES[problem.dtype]
    for name in [key[len("err_"):] for key in report if key.startswith("err_")]:
        err = report[f"err_{name}"]
        cond = report.get(f"cond_{name}", 1.0)
        merges = getattr(problem, "world_size", 1)  # partial results a row's result is merged from
        widen = max(1.0, cond * merges / COND_BASELINE)
        if dtype == torch.float64:
            # a cancelled float64 quantity: ulps of float64 times its conditioning
            rounding = ACCUMULATION_ULPS * torch.finfo(torch.float64).eps * cond
            bound = max(FLOAT64_RTOL, rounding, GRAD_FACTOR * report[f"dense_{name}"])
        else:
            factor = FORWARD_FACTOR if name == "out" else GRAD_FACTOR
            floor = max(torch.finfo(dtype).eps / 2, ACCUMULATION_ULPS * torch.finfo(torch.float32).eps)
            # the inputs' own rounding is a floor too: where dense's error is smaller, it
            # cancelled part of it by luck (one-token rows with a sink measured 2.8x)
            bound = factor * max(report[f"dense_{name}"], floor * widen, report.get(f"inputs_{name}", 0.0))
        if not err <= bound:
            bad[name] = f"error {err:.3g} > bound {bound:.3g}"
    return bad


def assert_matches_dense(problem, report: Dict[str, float]) -> None:
    """Raise AssertionError naming each quantity whose error breaks the tolerance rule."""
    bad = tolerance_violations(problem, report)
    if bad:
        details = ", ".join(f"{k}: {v}" for k, v in bad.items())
        raise AssertionError(f"{problem}: {details}")


# -- linear attention ------------------------------------------------------------------------

DECAYS = ("none", "head", "token", "channel")


@dataclass(frozen=True)
class _StateProblem:
    """What a linear-attention and a delta-rule problem share: a contiguous layout over a
    local world, head dims, a decay form among the subclass's `DECAYS`, the dtype, the scale,
    the memory layout of q, k, v and dO, and packed documents (`[0, l1, ..., seq_len]`,
    SeqLayout's cu_seqlens: the state restarts from zero at every document start)."""

    DECAYS = ()

    world_size: int
    seq_len: int
    batch: int = 1
    heads: int = 2
    key_dim: int = 8
    value_dim: int = 8
    decay: str = "token"  # one of DECAYS
    dtype: str = "float64"
    scale: float = 0.5
    seed: int = 0
    memory_layout: str = "contiguous"  # one of MEMORY_LAYOUTS: how q, k, v and dO are stored
    documents: Optional[Tuple[int, ...]] = None  # packed documents (cu_seqlens), or None

    def __post_init__(self):
        _check_memory_layout(self.memory_layout)
        if self.decay not in self.DECAYS:
            raise ValueError(f"decay: expected one of {self.DECAYS}, got {self.decay!r}")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def layout(self):
        """This rank's contiguous `SeqLayout` of the problem (collective)."""
        from ..layout import SeqLayout

        return SeqLayout(self.seq_len, cu_seqlens=self.documents)

    def _decay(self, gen):
        """The decay of this form, drawn from `gen`: log(u) for u uniform in (0, 1], from none
        to strong (None, `[H]`, `[B, N, H]` or `[B, N, H, Dk]`)."""
        b, n, h = self.batch, self.seq_len, self.heads
        shape = {"none": None, "head": (h,), "token": (b, n, h), "channel": (b, n, h, self.key_dim)}[self.decay]
        return None if shape is None else torch.rand(shape, generator=gen, dtype=torch.float64).clamp_min(1e-3).log()

    def full_decay(self, g):
        return g if g is None or g.dim() >= 3 else g.view(1, 1, -1).expand(self.batch, self.seq_len, -1)


@dataclass(frozen=True)
class LinearProblem(_StateProblem):
    """One causal linear-attention problem over a local world (contiguous layout).

    `decay`: "none", "head" (`[H]`), "token" (`[B, N, H]`) or "channel" (`[B, N, H, Dk]`, a
    gate per key channel, GLA). `documents`: None, or boundaries `[0, l1, ..., seq_len]`
    (SeqLayout's cu_seqlens): the state restarts from zero at every document start."""

    DECAYS = DECAYS

    def global_tensors(self):
        """q, k, v, d_out and the decay (None, `[H]`, `[B, N, H]` or `[B, N, H, Dk]`) in float64."""
        gen = torch.Generator().manual_seed(self.seed)
        b, n, h = self.batch, self.seq_len, self.heads
        q = torch.randn(b, n, h, self.key_dim, generator=gen, dtype=torch.float64)
        k = torch.randn(b, n, h, self.key_dim, generator=gen, dtype=torch.float64)
        v = torch.randn(b, n, h, self.value_dim, generator=gen, dtype=torch.float64)
        do = torch.randn(b, n, h, self.value_dim, generator=gen, dtype=torch.float64)
        return (*same_batch_rows((q, k, v, do), self.memory_layout), self._decay(gen))


def _linear_grads(q, k, v, g, do, scale, full, fn):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    g = None if g is None else g.detach().clone().requires_grad_()
    out = fn(q, k, v, full(g), scale=scale)
    out.backward(do)
    grads = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    if g is not None:
        grads["dg"] = g.grad
    return grads


def _linear_quadratic(q, k, v, g, scale, documents):
    """The quadratic form in the input dtype (what a plain PyTorch user would write), for
    every decay form and documents: `o_i = scale sum_{j <= i, same document}
    sum_c q_ic k_jc exp(G_ic - G_jc) v_j` (G the cumulative log decay, per channel or not)."""
    from ..kernels.reference import linear_attention_parallel

    if documents is None and (g is None or g.dim() == 3):
        return linear_attention_parallel(q, k, v, g, scale=scale)
    n = q.shape[1]
    visible = visibility(n, True, documents)
    if visible is None:
        visible = torch.ones(n, n, dtype=torch.bool).tril()
    if g is None:
        weights = visible.to(q.dtype)[None, None, :, :, None]  # [1, 1, n, n, 1]
    else:
        cum = g.to(q.dtype).cumsum(1)
        cum = (cum if cum.dim() == 4 else cum[..., None]).transpose(1, 2)  # [B, H, n, W]
        diff = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # [B, H, n, n, W]
        weights = diff.masked_fill(~visible[:, :, None], float("-inf")).exp()
    scores = torch.einsum("bihc,bjhc,bhijc->bhij", q, k, weights.expand(*weights.shape[:-1], q.shape[-1])
                          if weights.shape[-1] == 1 else weights)
    return torch.einsum("bhij,bjhv->bihv", scores, v) * scale


def _state_results(problem, attention, q, k, v, do, g, token_args=()) -> Dict[str, torch.Tensor]:
    """This rank's run of `attention(q, k, v, *token_args, layout=, decay=, scale=)` on its
    shards of the problem's global tensors (q, k, v in the problem's memory layout; each of
    `token_args` `(name, [B, N, H] tensor)` a leaf of its own, e.g. beta), backpropagated
    from dO: the output and every gradient (`d<name>` for `token_args`, `dg` for a tensor
    decay), checked for dtype and finiteness and gathered to the whole sequence (a per-head
    decay's gradient, of which each rank holds a share, summed over the ranks)."""
    import torch.distributed as dist

    from ..layout import gather_global

    layout = problem.layout()
    dtype = DTYPES[problem.dtype]
    mem = problem.memory_layout
    leaves, views = lay_out([layout.shard(t).to(dtype) for t in (q, k, v)], mem)
    extra = [(name, layout.shard(t).to(dtype).clone().requires_grad_()) for name, t in token_args]
    local_g = None
    if g is not None:
        local_g = (layout.shard(g) if g.dim() >= 3 else g).to(dtype).clone().requires_grad_()
    out = attention(*views, *(t for _, t in extra), layout=layout, decay=local_g, scale=problem.scale)
    if out.dtype != dtype or out.shape != views[2].shape:
        raise AssertionError(f"output has dtype {out.dtype} shape {tuple(out.shape)}, expected {dtype} "
                             f"{tuple(views[2].shape)}")
    out.backward(lay_out_grad(layout.shard(do).to(dtype), mem))
    dq, dk, dv = leaf_grads(leaves, mem, problem.batch)
    ours = {"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}
    ours.update({f"d{name}": t.grad for name, t in extra})
    if g is not None:
        ours["dg"] = local_g.grad
    _check_results(ours, dtype)
    if layout.world_size > 1:
        for name, t in list(ours.items()):
            if name == "dg" and t.dim() == 1:  # a per-head decay: every rank holds a share
                total = t.double()
                dist.all_reduce(total, group=layout.group)
                ours[name] = total
            else:
                ours[name] = gather_global(t, layout, 1)
    return ours


def check_linear_attention(problem: LinearProblem, **options) -> Dict[str, float]:
    """Run on every rank of a world of `problem.world_size`: compare `seqpar.linear_attention`
    (forward, dq, dk, dv and the decay's gradient) with the float64 recurrence (restarted at
    every document start). Returns, on every rank, `err_*` and `dense_*` (the quadratic
    form's error in the same dtype)."""
    from ..kernels.reference import linear_attention_recurrent
    from ..strategies.linear import linear_attention

    dtype = DTYPES[problem.dtype]
    q, k, v, do, g = problem.global_tensors()
    mem = problem.memory_layout
    ours = _state_results(problem, functools.partial(linear_attention, **options), q, k, v, do, g)
    documents = problem.documents

    def recurrent(q, k, v, g, scale):
        return linear_attention_recurrent(q, k, v, g, scale=scale, cu_seqlens=documents)[0]

    def quadratic(q, k, v, g, scale):
        return _linear_quadratic(q, k, v, g, scale, documents)

    ref = batch_mean(_linear_grads(q, k, v, g, do, problem.scale, problem.full_decay, recurrent), mem)
    report = {f"err_{name}": _rel_err(ours[name], ref[name]) for name in ref}
    low = [t.to(dtype) for t in (q, k, v)]
    dense = batch_mean(_linear_grads(*low, None if g is None else g.to(dtype), do.to(dtype), problem.scale,
                                     problem.full_decay, quadratic), mem)
    report.update({f"dense_{name}": _rel_err(dense[name], ref[name]) for name in ref})
    return report


# -- the gated delta rule ------------------------------------------------------------------

DELTA_DECAYS = ("none", "head", "token")


@dataclass(frozen=True)
class DeltaProblem(_StateProblem):
    """One gated-delta-rule problem over a local world (contiguous layout): k rows
    L2-normalised (as the models feed it), beta in (0, 1), `decay` "none", "head" (`[H]`)
    or "token" (`[B, N, H]`), optional `documents` (cu_seqlens)."""

    DECAYS = DELTA_DECAYS

    def global_tensors(self):
        """q, k, v, d_out, beta `[B, N, H]` and the decay (None, `[H]` or `[B, N, H]`), float64."""
        gen = torch.Generator().manual_seed(self.seed)
        b, n, h = self.batch, self.seq_len, self.heads
        q = torch.randn(b, n, h, self.key_dim, generator=gen, dtype=torch.float64)
        k = F.normalize(torch.randn(b, n, h, self.key_dim, generator=gen, dtype=torch.float64), dim=-1)
        v = torch.randn(b, n, h, self.value_dim, generator=gen, dtype=torch.float64)
        do = torch.randn(b, n, h, self.value_dim, generator=gen, dtype=torch.float64)
        beta = torch.rand(b, n, h, generator=gen, dtype=torch.float64)
        g = self._decay(gen)
        q, k, v, do, beta = same_batch_rows((q, k, v, do, beta), self.memory_layout)
        return q, k, v, do, beta, g


def _delta_grads(q, k, v, beta, g, do, problem, dtype):
    """Output and gradients of the token-by-token recurrence run in `dtype`."""
    from ..kernels.reference import delta_rule_recurrent

    q, k, v, beta = (t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v, beta))
    g = None if g is None else g.detach().to(dtype).clone().requires_grad_()
    out, _ = delta_rule_recurrent(q, k, v, beta, problem.full_decay(g), scale=problem.scale,
                                  cu_seqlens=problem.documents)
    out.backward(do.to(dtype))
    grads = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad, "dbeta": beta.grad}
    if g is not None:
        grads["dg"] = g.grad
    return grads


def check_delta_attention(problem: DeltaProblem, **options) -> Dict[str, float]:
    """Run on every rank of a world of `problem.world_size`: compare `seqpar.delta_attention`
    (forward, dq, dk, dv, dbeta and the decay's gradient) with the float64 recurrence.
    Returns `err_*` and `dense_*`: the error of the same recurrence run token by token in the
    problem's dtype (what a plain PyTorch user would write), and `inputs_*`, the float64
    recurrence on inputs rounded to the dtype."""
    from ..strategies.delta import delta_attention

    dtype = DTYPES[problem.dtype]
    q, k, v, do, beta, g = problem.global_tensors()
    mem = problem.memory_layout
    ours = _state_results(problem, functools.partial(delta_attention, **options), q, k, v, do, g,
                          token_args=[("beta", beta)])
    ref = batch_mean(_delta_grads(q, k, v, beta, g, do, problem, torch.float64), mem)
    report = {f"err_{name}": _rel_err(ours[name], ref[name]) for name in ref}
    dense = batch_mean(_delta_grads(q, k, v, beta, g, do, problem, dtype), mem)
    report.update({f"dense_{name}": _rel_err(dense[name], ref[name]) for name in ref})
    if dtype != torch.float64:
        rounded = [t.to(dtype).double() for t in (q, k, v, beta)]
        exact = _delta_grads(*rounded, None if g is None else g.to(dtype).double(), do.to(dtype).double(), problem,
                             torch.float64)
        report.update({f"inputs_{name}": _rel_err(t, ref[name]) for name, t in batch_mean(exact, mem).items()})
    return report
