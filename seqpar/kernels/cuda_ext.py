"""The compiled CUDA extension (`csrc/`, module `seqpar._C`): loading it, and its wrappers.

The wrappers `merge_`, `state_combine`, `state_combine_rows_` and `state_scan` call the
ops `torch.ops.seqpar_cuda.*` for CUDA tensors of the dtypes the kernels take when the
extension is loaded, and the torch formulas (`*_reference`, any device and float dtype)
otherwise, so a caller needs no branch. Shapes: merge `out` `[B, n, H, D]`, `lse`
`[B, H, n]`; linear-attention states `[B, H, Dk, Dv]`, log-space decays `[B, H]`
(values <= 0; the total decay of a rank or chunk). The block backend built on the
compiled merge, `backend="cuda"`, is `backends/cuda.py`.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from . import merge as merge_module

_MERGE_PART_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_state = {"loaded": None, "error": None}


def _load() -> bool:
    """Import `seqpar._C` once (its import registers the ops); False if it is not built."""
    if _state["loaded"] is None:
        try:
            importlib.import_module("seqpar._C")
        except (ImportError, OSError) as exc:  # not built, or built against another torch/CUDA
            _state["loaded"], _state["error"] = False, f"{type(exc).__name__}: {exc}"
        else:
            _register_fakes()
            _state["loaded"] = True
    return _state["loaded"]


def built() -> bool:
    """Whether the compiled extension `seqpar._C` imports."""
    return _load()


def available() -> bool:
    """Whether the compiled kernels can run here: built and a CUDA device present."""
    return _load() and torch.cuda.is_available()


def load_error() -> Optional[str]:
    """Why `seqpar._C` does not import (`ExcType: message`), or None when it does."""
    _load()
    return _state["error"]


# -- argument checks (shared by the CUDA path, the torch path and the fake kernels) -----

def _check_same_device(tensors) -> None:
    first_name, first = tensors[0]
    for name, t in tensors[1:]:
        if t.device != first.device:
            raise ValueError(f"{name}: expected device {first.device} (that of {first_name}), got {t.device}")


def _check_shape(t: torch.Tensor, name: str, expected) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {list(expected)}, got {list(t.shape)}")


def check_merge_args(out, lse, part_out, part_lse) -> None:
    """Shapes, dtypes and devices of a merge: out/part_out `[B, n, H, D]`, lse/part_lse `[B, H, n]`."""
    for name, t in (("out", out), ("lse", lse), ("part_out", part_out), ("part_lse", part_lse)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point dtype, got {t.dtype}")
    if out.dim() != 4:
        raise ValueError(f"out: expected 4 dims [B, n, H, D], got shape {list(out.shape)}")
    b, n, h, _ = out.shape
    _check_shape(lse, "lse", (b, h, n))
    _check_shape(part_out, "part_out", out.shape)
    _check_shape(part_lse, "part_lse", (b, h, n))
    _check_same_device((("out", out), ("lse", lse), ("part_out", part_out), ("part_lse", part_lse)))


def _check_states(named, decay_name: str, log_decay: torch.Tensor, decay_shape) -> None:
    first_name, first = named[0]
    for name, t in named + [(decay_name, log_decay)]:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point dtype, got {t.dtype}")
        if t.dtype != first.dtype:
            raise ValueError(f"{name}: expected dtype {first.dtype} (that of {first_name}), got {t.dtype}")
    for name, t in named[1:]:
        _check_shape(t, name, first.shape)
    _check_shape(log_decay, decay_name, decay_shape)
    _check_same_device(named + [(decay_name, log_decay)])


def _check_dims(t, name: str, dims: int, names: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name}: expected {dims} dims {names}, got shape {list(t.shape)}")


def _check_row_range(row_start, row_end, dk: int) -> None:
    for name, val in (("row_start", row_start), ("row_end", row_end)):
        if not isinstance(val, int) or isinstance(val, bool):
            raise TypeError(f"{name}: expected an int, got {type(val).__name__}")
    if not 0 <= row_start <= row_end <= dk:
        raise ValueError(f"row_start, row_end: expected 0 <= row_start <= row_end <= Dk = {dk}, got {row_start}, {row_end}")


# -- merge ------------------------------------------------------------------------------

merge_reference_ = merge_module.merge_


def _kernel_serves_merge(out, lse, part_out, part_lse) -> bool:
    return (out.is_cuda and out.dtype == torch.float32 and lse.dtype in (torch.float32, torch.float64)
            and part_out.dtype in _MERGE_PART_DTYPES and part_lse.dtype == torch.float32 and _load())


def merge_(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor) -> None:
    """Merge a partial result into `(out, lse)` in place: exactly `merge.merge_`.

    The compiled kernel serves CUDA tensors with out fp32, lse fp32 or fp64, part_out
    fp32/fp16/bf16, part_lse fp32, any strides (views of a larger accumulator included;
    out and lse must not overlap themselves or the part); `merge.merge_` serves the rest.
    """
    check_merge_args(out, lse, part_out, part_lse)
    if _kernel_serves_merge(out, lse, part_out, part_lse):
        torch.ops.seqpar_cuda.merge_(out, lse, part_out, part_lse)
    else:
        merge_reference_(out, lse, part_out, part_lse)


# -- linear-attention states ------------------------------------------------------------

def state_combine_reference(s_in: torch.Tensor, s_local: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """`exp(log_decay) * s_in + s_local` per (batch, head), in the states' dtype."""
    return torch.exp(log_decay)[..., None, None] * s_in + s_local


def state_scan_reference(states: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """Inclusive prefix combine over dim 0: `out[0] = states[0]`,
    `out[c] = exp(log_decay[c]) * out[c-1] + states[c]`."""
    out = torch.empty_like(states)
    for c in range(states.shape[0]):
        out[c] = states[c] if c == 0 else state_combine_reference(out[c - 1], states[c], log_decay[c])
    return out


def _kernel_serves_states(*tensors) -> bool:
    return tensors[0].is_cuda and all(t.dtype == torch.float32 for t in tensors) and _load()


def state_combine(s_in: torch.Tensor, s_local: torch.Tensor, log_decay: torch.Tensor, *,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`exp(log_decay) * s_in + s_local` for states `[B, H, R, Dv]` and `log_decay` `[B, H]`.

    Any strides, so a sub-block of Dk rows is a view (`s_local[:, :, r0:r1]`). `out`
    (default: a new contiguous tensor) may be `s_in` or `s_local` itself. Returns `out`.
    """
    _check_dims(s_in, "s_in", 4, "[B, H, Dk, Dv]")
    _check_states([("s_in", s_in), ("s_local", s_local)], "log_decay", log_decay, s_in.shape[:2])
    if out is None:
        out = torch.empty(s_in.shape, dtype=s_in.dtype, device=s_in.device)
    return state_combine_rows_(out, s_in, s_local, log_decay, 0, s_in.shape[2])


def state_combine_rows_(out: torch.Tensor, s_in: torch.Tensor, s_local: torch.Tensor, log_decay: torch.Tensor,
                        row_start: int, row_end: int) -> torch.Tensor:
    """Rows `[row_start, row_end)` of Dk of the combine, written into `out` in place (the
    other rows are not touched): the sub-block step of ZeCO's pipelined all-scan. All
    states `[B, H, Dk, Dv]`; `out` may be `s_in` or `s_local` itself. Returns `out`."""
    _check_dims(out, "out", 4, "[B, H, Dk, Dv]")
    _check_states([("out", out), ("s_in", s_in), ("s_local", s_local)], "log_decay", log_decay, out.shape[:2])
    _check_row_range(row_start, row_end, out.shape[2])
    if _kernel_serves_states(out, s_in, s_local, log_decay):
        torch.ops.seqpar_cuda.state_combine_(out, s_in, s_local, log_decay, row_start, row_end)
    else:
        rows = slice(row_start, row_end)
        out[:, :, rows] = state_combine_reference(s_in[:, :, rows], s_local[:, :, rows], log_decay)
    return out


def state_scan(states: torch.Tensor, log_decay: torch.Tensor, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inclusive prefix combine of a stack of states `[C, B, H, Dk, Dv]` in order, with the
    chunks' log decays `[C, B, H]`: `out[c] = exp(log_decay[c]) * out[c-1] + states[c]`,
    `out[0] = states[0]` (`log_decay[0]` is not used). `out` (default: new) may be
    `states` itself. Returns `out`."""
    _check_dims(states, "states", 5, "[C, B, H, Dk, Dv]")
    if out is None:
        out = torch.empty(states.shape, dtype=states.dtype, device=states.device)
    _check_states([("states", states), ("out", out)], "log_decay", log_decay, states.shape[:3])
    if _kernel_serves_states(out, states, log_decay):
        torch.ops.seqpar_cuda.state_scan_(out, states, log_decay)
    else:
        out.copy_(state_scan_reference(states, log_decay))
    return out


# -- fake (meta) kernels of the compiled ops, for torch.compile ---------------------------

def _register_fakes() -> None:
    def merge_fake(out, lse, part_out, part_lse):
        check_merge_args(out, lse, part_out, part_lse)

    def combine_fake(out, s_in, s_local, log_decay, row_start, row_end):
        _check_states([("out", out), ("s_in", s_in), ("s_local", s_local)], "log_decay", log_decay, out.shape[:2])

    def scan_fake(out, states, log_decay):
        _check_states([("states", states), ("out", out)], "log_decay", log_decay, states.shape[:3])

    torch.library.register_fake("seqpar_cuda::merge_")(merge_fake)
    torch.library.register_fake("seqpar_cuda::state_combine_")(combine_fake)
    torch.library.register_fake("seqpar_cuda::state_scan_")(scan_fake)
