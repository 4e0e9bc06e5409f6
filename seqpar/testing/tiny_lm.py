"""A tiny causal transformer with random weights, for testing generation with Star attention.

RMSNorm, RoPE, grouped-query attention, a SiLU MLP, tied to nothing. The model is written
as `forward(weights, input_ids, positions, attend) -> logits`, the form `star_generate`
takes once `weights` is bound (`functools.partial(forward, weights)`): each attention
layer calls `attend(layer, q, k, v)`. `reference_greedy` decodes with dense attention,
either exactly or under Star's phase-1 mask (the float64 oracle for `star_generate`), and
`divergence` compares two decodings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from ..kernels.reference import dense_attention, star_context_mask


@dataclass(frozen=True)
class TinyLMConfig:
    vocab: int = 64
    dim: int = 32
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    layers: int = 2
    # >1 sharpens the next-token distribution, so greedy choices are not near-ties
    logit_scale: float = 4.0


def init_weights(config: TinyLMConfig, seed: int, dtype=torch.float64) -> Dict:
    gen = torch.Generator().manual_seed(seed)

    def w(*shape, scale):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    c = config
    inner = c.heads * c.head_dim
    layers = [
        {
            "wq": w(c.dim, inner, scale=c.dim ** -0.5),
            "wk": w(c.dim, c.kv_heads * c.head_dim, scale=c.dim ** -0.5),
            "wv": w(c.dim, c.kv_heads * c.head_dim, scale=c.dim ** -0.5),
            "wo": w(inner, c.dim, scale=inner ** -0.5),
            "w1": w(c.dim, 4 * c.dim, scale=c.dim ** -0.5),
            "w2": w(4 * c.dim, c.dim, scale=(4 * c.dim) ** -0.5),
        }
        for _ in range(c.layers)
    ]
    return {
        "config": c,
        "embed": w(c.vocab, c.dim, scale=1.0),
        "layers": layers,
        "head": w(c.dim, c.vocab, scale=c.logit_scale * c.dim ** -0.5),
    }


def random_prompt(config: TinyLMConfig, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(config.vocab, (batch, seq_len), generator=gen)


def _rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of `x` `[B, n, H, D]` at global `positions` `[n]` (computed in fp64)."""
    half = x.shape[-1] // 2
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)
    angles = positions.to(device=x.device, dtype=torch.float64)[:, None] * freqs[None]  # [n, D/2]
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]
    x1, x2 = x[..., :half].double(), x[..., half:].double()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def forward(weights: Dict, input_ids: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
    """Logits `[B, n, V]` of `input_ids` `[B, n]` at global `positions` `[n]`."""
    c = weights["config"]
    h = weights["embed"][input_ids]
    b, n, _ = h.shape
    for i, layer in enumerate(weights["layers"]):
        x = _rms(h)
        q = rope((x @ layer["wq"]).view(b, n, c.heads, c.head_dim), positions)
        k = rope((x @ layer["wk"]).view(b, n, c.kv_heads, c.head_dim), positions)
        v = (x @ layer["wv"]).view(b, n, c.kv_heads, c.head_dim)
        h = h + attend(i, q, k, v).reshape(b, n, -1) @ layer["wo"]
        h = h + F.silu(_rms(h) @ layer["w1"]) @ layer["w2"]
    return _rms(h) @ weights["head"]


def reference_greedy(weights: Dict, prompt: torch.Tensor, max_new_tokens: int,
                     local_lens: Optional[Sequence[int]] = None, anchor_len: int = 0):
    """Greedy decoding on one device with dense attention and a plain KV cache.

    `local_lens=None`: exact causal attention. Otherwise the prompt is encoded under Star's
    phase-1 mask for contiguous blocks of these lengths and `anchor_len` (what
    `star_generate` computes), and later tokens attend exactly to the cache. Returns
    tokens `[B, max_new_tokens]` and the fp32 logits that chose them `[B, max_new_tokens, V]`.
    """
    n = prompt.shape[1]
    mask = None if local_lens is None else star_context_mask(local_lens, anchor_len)
    cache = {}

    def prefill(layer, q, k, v):
        cache[layer] = (k, v)
        return dense_attention(q, k, v, causal=True, mask=mask)

    def decode(layer, q, k, v):
        k_all, v_all = (torch.cat([old, new], dim=1) for old, new in zip(cache[layer], (k, v)))
        cache[layer] = (k_all, v_all)
        m = k_all.shape[1]
        return dense_attention(q, k_all, v_all, causal=True, q_positions=torch.arange(m - q.shape[1], m),
                               k_positions=torch.arange(m))

    tokens, chosen = [], []
    with torch.no_grad():
        logits = forward(weights, prompt, torch.arange(n), prefill)[:, -1].float()
        for step in range(max_new_tokens):
            token = logits.argmax(-1)
            tokens.append(token)
            chosen.append(logits)
            if step < max_new_tokens - 1:
                logits = forward(weights, token[:, None], torch.tensor([n + step]), decode)[:, -1].float()
    return torch.stack(tokens, dim=1), torch.stack(chosen, dim=1)


def divergence(tokens, logits, ref_tokens, ref_logits) -> Dict[str, float]:
    """How far a decoding strays from a reference (both `[B, T]` tokens, `[B, T, V]` logits).

    `first_divergence`: the first step at which any sequence of the batch differs (T if
    none); `match_fraction`: matching tokens over all B*T (position by position);
    `logit_err_first`: max |logit - ref| / max |ref| at step 0 (same prefix by construction);
    `logit_err_shared`: the same over the steps before the first divergence.
    """
    differs = (tokens != ref_tokens).any(dim=0)
    steps = tokens.shape[1]
    first = int(differs.nonzero()[0, 0]) if differs.any() else steps
    scale = ref_logits.abs().max().item() or 1.0

    def err(a, b):
        return (a.double() - b.double()).abs().max().item() / scale

    return {
        "first_divergence": first,
        "match_fraction": (tokens == ref_tokens).double().mean().item(),
        "logit_err_first": err(logits[:, 0], ref_logits[:, 0]),
        "logit_err_shared": err(logits[:, :max(first, 1)], ref_logits[:, :max(first, 1)]),
    }
