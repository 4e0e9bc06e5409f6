"""The block backends: one module per backend, and the one registry of them.

Every backend module has the same small interface:

- `forward(q, k, v, scale, offset) -> (out, lse)` and
  `backward(do, q, k, v, out, lse, scale, offset) -> (dq, dk, dv)`, the block kernels
  (the contract is block.py's: shapes, the causal offset, the final out/lse in the
  backward, the NaN rule);
- `merge`: the in-place merge `(out, lse) <- (out, lse) + (part_out, part_lse)` its blocks
  go with, or None for the reference merge (`merge.merge_`);
- `unavailable_reason(device, dtype, head_dim, scale) -> Optional[str]`: why it cannot
  serve this case on this machine, or None when it can.

`torch_math` (backend "torch") is the reference math; `sdpa` and `flash_attn` run fused
kernels that only know "no mask" and "square causal" through `pieces.py`; `triton` takes
the offset natively and merges with its fused merge; `cuda` is sdpa's blocks merged by the
compiled extension. The strategies reach the backends through block.py (`kernels()`,
which wraps them in its custom ops); this module chooses and checks them.
"""
from __future__ import annotations

from types import ModuleType
from typing import Callable, Dict, Optional

import torch

from ..merge import merge_ as reference_merge
from . import cuda, flash_attn, sdpa, torch_math, triton

BACKENDS = ("auto", "torch", "sdpa", "triton", "flash_attn", "cuda")

# the concrete backends, by name
MODULES: Dict[str, ModuleType] = {
    "torch": torch_math,
    "sdpa": sdpa,
    "flash_attn": flash_attn,
    "triton": triton,
    "cuda": cuda,
}

MergeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def get(backend: str) -> ModuleType:
    """The module of a concrete backend name; ValueError for any other name."""
    module = MODULES.get(backend)
    if module is None:
        raise ValueError(f"backend: expected a concrete block backend {tuple(MODULES)}, got {backend!r}")
    return module


def merge_kernel(backend: str) -> MergeFn:
    """The in-place merge `(out, lse) <- (out, lse) + (part_out, part_lse)` that the
    strategies use for the blocks of `backend` (a concrete backend name): the backend's
    fused merge, or the reference merge."""
    merge = get(backend).merge
    return reference_merge if merge is None else merge


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                       scale: float = 1.0, softcap: float = 0.0) -> Optional[str]:
    """Why `backend` cannot serve this case on this machine, or None when it can."""
    module = MODULES.get(backend)
    if module is None:
        return f"unknown backend {backend!r}"
    if softcap and not getattr(module, "SOFTCAP", False):
        return f"{backend} has no softcap, got softcap={softcap} (backend='torch' or 'triton' serves it)"
    return module.unavailable_reason(device, dtype, head_dim, scale)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, scale: float = 1.0,
                    softcap: float = 0.0, value_dim: Optional[int] = None) -> str:
    """The concrete backend for `backend`; "auto" takes the first that can serve of:

    - cuda: flash_attn, cuda (PyTorch's flash op + seqpar's compiled merge, when the
      extension is built), sdpa, triton, torch. The compiled kernels come first; Triton then
      serves what they cannot: float32, softmax_scale <= 0.
    - other devices: sdpa, torch. Triton on cpu is only its interpreter, never chosen.
      With a value head dim of its own (`value_dim` != `head_dim`) the torch math: PyTorch's
      SDPA then runs its math kernel, whose float32 gradients are about 8x more precise
      than the fused op's (which block.py would run padded): on saturated rows the fused
      backward's exp(s - lse) with lse rounded to float32 gave dV 5e-6 off against the math
      kernel's 6e-7.

    A backend without a value head dim of its own runs q/k/v padded to the larger of the
    two head dims (block.py), so its availability is judged at that width.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if value_dim is not None and value_dim != head_dim:
        if backend == "auto" and device.type != "cuda":
            return "torch"
        head_dim = max(head_dim, value_dim)
    if backend != "auto":
        reason = unavailable_reason(backend, device, dtype, head_dim, scale, softcap)
        if reason is not None:
            raise ValueError(f"backend: {reason}")
        return backend
    order = ("flash_attn", "cuda", "sdpa", "triton", "torch") if device.type == "cuda" else ("sdpa", "torch")
    for candidate in order:
        if unavailable_reason(candidate, device, dtype, head_dim, scale, softcap) is None:
            return candidate
    return "torch"


_verified: set = set()


def verify_once(backend: str, q: torch.Tensor) -> None:
    """First use of a backend not exercised by the CPU test suite on a device: compare a
    tiny GQA block (forward and backward, square causal and offset) with the torch math,
    so a changed private kernel API raises instead of returning wrong numbers. A
    ValueError: entry points call this in their local check, before the cross-rank
    agreement, so a backend that fails on one device raises on every rank."""
    key = (backend, q.device, q.dtype)
    # on cpu the test suite exercises sdpa and triton (the interpreter) directly
    if key in _verified or (backend in ("sdpa", "triton") and q.device.type == "cpu") or backend == "torch":
        return
    module = get(backend)
    gen = torch.Generator(device="cpu").manual_seed(0)
    h_kv = 2
    shape_q, shape_k = (1, 37, 2 * h_kv, q.shape[-1]), (1, 37, h_kv, q.shape[-1])
    tq, tk, tv, tdo = (
        torch.randn(s, generator=gen).to(device=q.device, dtype=q.dtype) for s in (shape_q, shape_k, shape_k, shape_q)
    )
    scale = q.shape[-1] ** -0.5
    for offset in (0, 5, None):
        out, lse = module.forward(tq, tk, tv, scale, offset)
        ref_out, ref_lse = torch_math.forward(tq, tk, tv, scale, offset)
        grads = module.backward(tdo, tq, tk, tv, ref_out.to(q.dtype), ref_lse, scale, offset)
        ref_grads = torch_math.backward(tdo, tq, tk, tv, ref_out.to(q.dtype), ref_lse, scale, offset)
        tol = 5e-2 if q.dtype in (torch.float16, torch.bfloat16) else 1e-4
        pairs = [(out, ref_out), (lse, ref_lse)] + list(zip(grads, ref_grads))
        for got, want in pairs:
            if not torch.allclose(got.float(), want.float(), atol=tol, rtol=tol):
                raise ValueError(
                    f"backend {backend!r} disagrees with the reference math on {q.device} {q.dtype} "
                    f"(offset={offset}); use backend='torch' and report this"
                )
    _verified.add(key)
