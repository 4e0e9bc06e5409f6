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
test luck. Errors are max-abs, relative to the largest reference value.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

FLOAT64_RTOL = 1e-10
FORWARD_FACTOR = 2.0
GRAD_FACTOR = 3.0
ACCUMULATION_ULPS = 8
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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

    @property
    def softmax_scale(self) -> float:
        return self.logit_scale * self.head_dim ** -0.5

    def replace(self, **changes) -> "AttentionProblem":
        return dataclasses.replace(self, **changes)

    def global_tensors(self):
        """q, k, v, d_out in float64, identical on every rank."""
        gen = torch.Generator().manual_seed(self.seed)
        b, n, d = self.batch, self.seq_len, self.head_dim
        q = torch.randn(b, n, self.heads, d, generator=gen, dtype=torch.float64)
        k = torch.randn(b, n, self.kv_heads, d, generator=gen, dtype=torch.float64)
        v = torch.randn(b, n, self.kv_heads, d, generator=gen, dtype=torch.float64)
        do = torch.randn(b, n, self.heads, d, generator=gen, dtype=torch.float64)
        return q, k, v, do


def _dense_grads(q, k, v, do, causal, scale, use_sdpa):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if use_sdpa:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=scale,
            enable_gqa=q.shape[2] != k.shape[2],
        ).transpose(1, 2)
    else:
        from ..kernels.reference import dense_attention

        out = dense_attention(q, k, v, causal=causal, softmax_scale=scale)
    out.backward(do)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item() or 1.0
    return (got.double() - want).abs().max().item() / scale


def check_attention(problem: AttentionProblem, attention_fn: Optional[Callable] = None, **options) -> Dict[str, float]:
    """Run on every rank of a world of `problem.world_size`: compare `attention_fn` with dense.

    `attention_fn(q, k, v, *, layout, causal, softmax_scale, **options)` defaults to
    `seqpar.attention`. Returns, identically on every rank, the relative max error of the
    output and of dq, dk, dv against float64 dense attention (`err_*`) and, for low
    precisions, dense PyTorch's own error in the same dtype (`dense_*`).
    """
    from ..attention import attention
    from ..layout import SeqLayout, gather_global

    fn = attention if attention_fn is None else attention_fn
    layout = SeqLayout(problem.seq_len, scheme=problem.scheme)
    dtype = DTYPES[problem.dtype]
    q, k, v, do = problem.global_tensors()
    local = [layout.shard(t).to(dtype).detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*local, layout=layout, causal=problem.causal, softmax_scale=problem.softmax_scale, **options)
    if out.dtype != dtype or out.shape != local[0].shape:
        raise AssertionError(f"output has dtype {out.dtype} shape {tuple(out.shape)}, expected {dtype} {tuple(local[0].shape)}")
    out.backward(layout.shard(do).to(dtype))
    ours = {"out": out.detach(), "dq": local[0].grad, "dk": local[1].grad, "dv": local[2].grad}
    for name, t in ours.items():
        if t is None:
            raise AssertionError(f"{name} is missing")
        if t.dtype != dtype:
            raise AssertionError(f"{name} has dtype {t.dtype}, expected {dtype}")
        if not torch.isfinite(t).all():
            raise AssertionError(f"{name} has non-finite values")
    ours = {name: gather_global(t, layout, 1) if layout.world_size > 1 else t for name, t in ours.items()}
    ref = _dense_grads(q, k, v, do, problem.causal, problem.softmax_scale, use_sdpa=False)
    report = {f"err_{name}": _rel_err(ours[name], ref[name]) for name in ref}
    # dense PyTorch (SDPA) in the same dtype: its error is the yardstick (in float64, the
    # disagreement of two float64 implementations, which ill-conditioned problems inflate)
    low = [t.to(dtype) for t in (q, k, v, do)]
    dense = _dense_grads(*low, problem.causal, problem.softmax_scale, use_sdpa=True)
    report.update({f"dense_{name}": _rel_err(dense[name], ref[name]) for name in ref})
    return report


def tolerance_violations(problem: AttentionProblem, report: Dict[str, float]) -> Dict[str, str]:
    """Which errors of a `check_attention` report break the rule; empty when all hold."""
    bad = {}
    dtype = DTYPES[problem.dtype]
    for name in ("out", "dq", "dk", "dv"):
        err = report[f"err_{name}"]
        if dtype == torch.float64:
            bound = max(FLOAT64_RTOL, GRAD_FACTOR * report[f"dense_{name}"])
        else:
            factor = FORWARD_FACTOR if name == "out" else GRAD_FACTOR
            floor = max(torch.finfo(dtype).eps / 2, ACCUMULATION_ULPS * torch.finfo(torch.float32).eps)
            bound = factor * max(report[f"dense_{name}"], floor)
        if not err <= bound:
            bad[name] = f"error {err:.3g} > bound {bound:.3g}"
    return bad


def assert_matches_dense(problem: AttentionProblem, report: Dict[str, float]) -> None:
    """Raise AssertionError naming each quantity whose error breaks the tolerance rule."""
    bad = tolerance_violations(problem, report)
    if bad:
        details = ", ".join(f"{k}: {v}" for k, v in bad.items())
        raise AssertionError(f"{problem}: {details}")
