"""How error messages show a value: one line, never a whole tensor."""
from __future__ import annotations

import torch

_MAX_ITEMS = 8


def brief(value) -> str:
    """`value` for an error message: tensors by shape, dtype and device; long sequences cut."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return f"tensor({value.item()!r}, dtype={value.dtype})"
        return f"a tensor of shape {tuple(value.shape)}, dtype {value.dtype} on {value.device.type}"
    if isinstance(value, (list, tuple)) and len(value) > _MAX_ITEMS:
        head = ", ".join(repr(x) for x in value[:_MAX_ITEMS])
        return f"{type(value).__name__} of {len(value)} items [{head}, ...]"
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."
