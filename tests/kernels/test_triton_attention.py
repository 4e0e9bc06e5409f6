"""The Triton block kernels against the torch reference math (block.torch_forward/backward).

Without CUDA they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
in float32 and float16 (the interpreter has no bfloat16), at small sizes and with the
smallest tiles (16), so that small blocks still cross tile edges, diagonals and padding.
"""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqpar.kernels import backends, block
from triton_compile import compile_for_sm90

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_REASON = block.unavailable_reason("triton", DEVICE, torch.float32, 64)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"triton backend unavailable: {_REASON}")

if _REASON is None:
    from seqpar.kernels.triton import attention as triton_attention

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
# max error relative to the largest reference value; float16/bfloat16 round P and dS to the
# input dtype before the second matmul of each pair (as flash-attention does)
TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (batch, nq, nk, heads, kv_heads, head_dim, offset): every case runs forward and backward
CASES = {
    "no-mask": (2, 40, 33, 2, 1, 16, None),
    "square-causal": (1, 37, 37, 2, 2, 16, 0),
    "offset-negative": (1, 40, 33, 4, 2, 16, -7),
    "offset-positive": (1, 21, 50, 3, 1, 24, 20),
    "offset-past-the-block": (1, 19, 17, 2, 1, 16, 1000),
    "offset-last-key-only": (1, 19, 17, 2, 1, 16, 16),
    "offset-nothing-visible": (1, 19, 17, 2, 1, 16, -19),
    "offset-huge-negative": (1, 19, 17, 2, 1, 16, -10 ** 6),
    "offset-last-row-sees-one-key": (1, 19, 17, 2, 1, 16, -18),
    "one-row": (1, 1, 29, 4, 2, 16, 3),
    "one-key": (1, 29, 1, 4, 2, 16, -5),
    "one-by-one": (1, 1, 1, 2, 1, 16, 0),
    "one-by-one-masked": (1, 1, 1, 2, 1, 16, -1),
    "head-dim-5": (1, 23, 18, 2, 2, 5, 2),
    "head-dim-33": (1, 23, 18, 2, 1, 33, -4),
    "head-dim-1": (1, 9, 9, 2, 1, 1, 0),
    "mqa-4-to-1": (1, 20, 35, 4, 1, 8, 10),
    "gqa-3-groups": (1, 33, 33, 6, 3, 16, 0),
}
# query x key tiles other than the square default: the skipped / unmasked / masked ranges
# are computed per tile size, so BLOCK_M != BLOCK_N needs its own cases
TILED_CASES = ["square-causal", "offset-negative", "offset-positive", "gqa-3-groups"]
TILES = [(32, 16), (16, 32), (None, None)]  # None: the device's default tiles
TILES16 = {"block_m": 16, "block_n": 16}


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty that fills floats with NaN: an element a kernel forgets to write fails."""
    empty = torch.empty

    def nan_filled(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_filled)


def _problem(nq, nk, heads, kv_heads, head_dim, dtype, seed=0, batch=1):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, nq, heads, head_dim), (batch, nk, kv_heads, head_dim), (batch, nk, kv_heads, head_dim),
              (batch, nq, heads, head_dim)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype) for s in shapes]


def _rel(got, want):
    """Max error relative to the largest reference value, at least 1: the inputs are O(1),
    and a gradient that cancels to ~0 (a row that sees one key has dq = 0) has no scale."""
    scale = max(want.abs().max().item(), 1.0)
    return (got.double() - want.double()).abs().max().item() / scale


def _reference(q, k, v, do, scale, offset):
    """Forward and backward in float64 from the same (rounded) inputs."""
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, do))
    out, lse = block.torch_forward(q64, k64, v64, scale, offset)
    grads = block.torch_backward(do64, q64, k64, v64, out, lse, scale, offset)
    return out, lse, grads


def _check_block(q, k, v, do, scale, offset, tiles=(16, 16)):
    dtype = q.dtype
    ref_out, ref_lse, ref_grads = _reference(q, k, v, do, scale, offset)
    out, lse = triton_attention.forward(q, k, v, scale, offset, block_m=tiles[0], block_n=tiles[1])
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == q.shape and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    blind = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), blind), "rows that see no key must get lse = -inf, and only they"
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.all(out.transpose(1, 2)[blind] == 0), "rows that see no key must get out = 0"
    tol = TOLERANCE[dtype]
    assert _rel(out, ref_out) <= tol
    if (~blind).any():
        # lse is compared in absolute terms: it is a log, its error is relative to 1
        assert (lse[~blind].double() - ref_lse[~blind]).abs().max().item() <= tol * max(1.0, ref_lse[~blind].abs().max().item())
    # the backward gets the final (out, lse) of the rows, like the strategies give it
    grads = triton_attention.backward(do, q, k, v, ref_out.to(dtype), ref_lse.float(), scale, offset,
                                      block_m=tiles[0], block_n=tiles[1])
    for name, got, want, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert got.dtype == torch.float32 and got.shape == x.shape, name
        assert torch.isfinite(got).all(), name
        assert _rel(got, want) <= 3 * tol, f"{name}: {_rel(got, want):.3g} > {3 * tol:.3g}"
    return out, lse, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_block_matches_reference(case, dtype, nan_empty):
    batch, nq, nk, heads, kv_heads, head_dim, offset = CASES[case]
    q, k, v, do = _problem(nq, nk, heads, kv_heads, head_dim, dtype, seed=nq * nk, batch=batch)
    _check_block(q, k, v, do, head_dim ** -0.5, offset)


@pytest.mark.parametrize("tiles", TILES, ids=lambda t: f"tiles{t[0] or 'default'}x{t[1] or 'default'}")
@pytest.mark.parametrize("case", TILED_CASES)
def test_block_matches_reference_other_tiles(case, tiles, nan_empty):
    batch, nq, nk, heads, kv_heads, head_dim, offset = CASES[case]
    q, k, v, do = _problem(nq, nk, heads, kv_heads, head_dim, torch.float32, seed=nq * nk, batch=batch)
    _check_block(q, k, v, do, head_dim ** -0.5, offset, tiles)


# a third of the profile's examples: the interpreter costs ~0.3 s per example
@settings(max_examples=max(1, settings.default.max_examples // 3))
@given(nq=st.integers(1, 40), nk=st.integers(1, 40), offset_draw=st.one_of(st.none(), st.integers(-45, 45)),
       kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]), head_dim=st.sampled_from([3, 16, 20]),
       seed=st.integers(0, 1000))
def test_block_matches_reference_hypothesis(nq, nk, offset_draw, kv_heads, group, head_dim, seed):
    q, k, v, do = _problem(nq, nk, kv_heads * group, kv_heads, head_dim, torch.float32, seed=seed)
    _check_block(q, k, v, do, 0.6, offset_draw)


@pytest.mark.parametrize("scale", [-0.7, 0.0, 3.0])
def test_any_softmax_scale(scale, nan_empty):
    # negative and zero scales are legal math; the mask must still win after the scaling
    q, k, v, do = _problem(20, 20, 2, 1, 16, torch.float32, seed=5)
    _check_block(q, k, v, do, scale, -2)


def test_offsets_around_tile_edges(nan_empty):
    # an 18 x 21 block in 16-row / 16-key tiles: offsets where the first or last row of a
    # tile starts or stops seeing a tile of keys, and the ends (nothing / everything visible)
    q, k, v, do = _problem(18, 21, 1, 1, 16, torch.float32, seed=11)
    for offset in (-18, -17, -16, -15, -1, 0, 1, 4, 5, 15, 16, 19, 20):
        _check_block(q, k, v, do, 0.5, offset)


def test_strided_inputs_give_the_same_result():
    # the strategies pass [B, n, H, D] views over heads-major memory, slices of longer
    # buffers, and lse slices: results must not depend on the strides
    q, k, v, do = _problem(26, 21, 2, 1, 16, torch.float32, seed=3, batch=2)
    heads_major = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, do)]
    padded = [torch.cat([t, t[:, :3]], dim=1)[:, :t.shape[1]] for t in (q, k, v, do)]
    out, lse = triton_attention.forward(q, k, v, 0.3, 4, **TILES16)
    grads = triton_attention.backward(do, q, k, v, out, lse, 0.3, 4, **TILES16)
    for qs, ks, vs, dos in (heads_major, padded):
        assert not qs.is_contiguous()
        out_s, lse_s = triton_attention.forward(qs, ks, vs, 0.3, 4, **TILES16)
        assert torch.equal(out_s, out) and torch.equal(lse_s, lse)
        wide_lse = torch.full((2, 2, 30), float("nan"), device=DEVICE)
        wide_lse[:, :, 2:28] = lse
        out_view = out.transpose(1, 2).contiguous().transpose(1, 2)
        grads_s = triton_attention.backward(dos, qs, ks, vs, out_view, wide_lse[:, :, 2:28], 0.3, 4,
                                           **TILES16)
        for got, want in zip(grads_s, grads):
            assert torch.equal(got, want)


def test_backward_is_deterministic():
    # no atomics: the group sums of dK/dV run in a fixed order
    q, k, v, do = _problem(40, 37, 4, 2, 16, torch.float32, seed=4)
    out, lse = triton_attention.forward(q, k, v, 0.3, 3)
    first = triton_attention.backward(do, q, k, v, out, lse, 0.3, 3)
    second = triton_attention.backward(do, q, k, v, out, lse, 0.3, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_empty_blocks(nan_empty):
    for nq, nk in ((0, 5), (5, 0)):
        q, k, v, do = _problem(nq, nk, 2, 1, 16, torch.float32, batch=2)
        out, lse = triton_attention.forward(q, k, v, 0.3, None)
        assert out.shape == q.shape and lse.shape == (2, 2, nq)
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
        dq, dk, dv = triton_attention.backward(do, q, k, v, out, lse, 0.3, None)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        assert all(torch.all(g == 0) for g in (dq, dk, dv))


def test_bad_input_names_the_argument():
    q, k, v, do = _problem(4, 4, 4, 2, 16, torch.float32, batch=2)
    with pytest.raises(ValueError, match="q: the triton backend takes float16, bfloat16 or float32, got torch.float64"):
        triton_attention.forward(q.double(), k, v, 0.3, None)
    with pytest.raises(ValueError, match=r"k: expected KV heads dividing the query heads \(4\), got 3"):
        triton_attention.forward(q, k[:, :, :1].expand(2, 4, 3, 16), v[:, :, :1].expand(2, 4, 3, 16), 0.3, None)
    with pytest.raises(ValueError, match=r"k, v: expected shape \[B=2, n_k, H_kv, D=16\]"):
        triton_attention.forward(q, k[..., :8], v[..., :8], 0.3, None)
    with pytest.raises(ValueError, match="q: the triton backend takes head_dim <= 256, got 300"):
        triton_attention.forward(*(torch.zeros(1, 2, 1, 300, device=DEVICE) for _ in range(3)), 0.3, None)
    with pytest.raises(ValueError, match=r"lse: expected shape \(2, 4, 4\), got \(2, 4, 3\)"):
        triton_attention.backward(do, q, k, v, q, torch.zeros(2, 4, 3, device=DEVICE), 0.3, None)


def test_registry_and_unavailable_reasons(monkeypatch):
    # the registry's "triton" runs these kernels
    monkeypatch.setattr(triton_attention, "forward", lambda *args, **kw: ("forward", args, kw))
    monkeypatch.setattr(triton_attention, "backward", lambda *args, **kw: ("backward", args, kw))
    assert backends.get("triton").forward(1, 2, 3, 0.5, None) == ("forward", (1, 2, 3, 0.5, None), {"softcap": 0.0})
    assert backends.get("triton").backward(1, 2, 3, 4, 5, 6, 0.5, 7, softcap=2.0) == (
        "backward", (1, 2, 3, 4, 5, 6, 0.5, 7), {"softcap": 2.0})
    assert "float64" in block.unavailable_reason("triton", DEVICE, torch.float64, 64)
    assert "head_dim <= 256, got 512" in block.unavailable_reason("triton", DEVICE, torch.float32, 512)
    assert "got mps" in block.unavailable_reason("triton", torch.device("mps"), torch.float32, 64)
    if DEVICE.type == "cpu":
        assert block.unavailable_reason("triton", DEVICE, torch.float16, 64) is None
        assert "no bfloat16" in block.unavailable_reason("triton", DEVICE, torch.bfloat16, 64)
        assert "unset it" in block.unavailable_reason("triton", torch.device("cuda"), torch.float32, 64)


def test_auto_prefers_compiled_kernels_then_triton_on_cuda(monkeypatch):
    # as if the kernels were compiled for CUDA (this machine may run the interpreter)
    monkeypatch.setattr(triton_attention, "INTERPRETED", False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    expected_16bit = "flash_attn" if block.unavailable_reason("flash_attn", cuda, torch.float16, 64) is None else "sdpa"
    assert block.resolve_backend("auto", cuda, torch.float16, 64) == expected_16bit
    assert block.resolve_backend("auto", cuda, torch.float32, 64) == "triton"  # sdpa/flash-attn: 16-bit only
    assert block.resolve_backend("auto", cuda, torch.float16, 64, scale=-1.0) == "triton"
    assert block.resolve_backend("auto", cuda, torch.float64, 64) == "torch"
    # on cpu triton is only the interpreter: never chosen by "auto"
    monkeypatch.setattr(triton_attention, "INTERPRETED", True)
    assert block.resolve_backend("auto", cpu, torch.float32, 64, scale=-1.0) == "torch"


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpu interpreter guard")
def test_cpu_without_the_interpreter_is_refused():
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    code = ("import torch; from seqpar.kernels import block; "
            "print(block.unavailable_reason('triton', torch.device('cpu'), torch.float32, 64))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "set TRITON_INTERPRET=1" in result.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("offset", [None, 0, -100, 129, 700])
def test_gpu_sizes_with_default_tiles(dtype, offset):
    q, k, v, do = _problem(1000, 777, 8, 2, 128, dtype, seed=1, batch=2)
    _check_block(q, k, v, do, 128 ** -0.5, offset, tiles=(None, None))
    q, k, v, do = _problem(300, 257, 4, 4, 80, dtype, seed=2, batch=2)
    _check_block(q, k, v, do, 80 ** -0.5, offset, tiles=(None, None))


def test_folded_grid_visits_every_tile_of_every_row_once():
    """The launch grid puts tiles x rows on axis 0 (axes 1 and 2 stop at 65535 on CUDA);
    the kernels' (tile, row) from a program id is `divmod` in reverse."""
    from seqpar.kernels.triton.grid import folded_grid

    for n, block_rows, rows in [(1, 16, 1), (40, 16, 3), (64, 16, 70000), (1000, 128, 5)]:
        (programs,) = folded_grid(n, block_rows, rows)
        tiles = -(-n // block_rows)
        assert programs == tiles * rows
        seen = {(pid % tiles, pid // tiles) for pid in range(0, programs, max(1, programs // 5000))}
        assert all(0 <= t < tiles and 0 <= r < rows for t, r in seen)
        if programs <= 5000:
            assert len(seen) == programs  # each (tile, row) once
    with pytest.raises(ValueError, match="batch x heads: expected at most 2\\^31 - 1 programs"):
        folded_grid(2 ** 20, 16, 2 ** 16)


@pytest.mark.gpu
def test_gpu_more_than_65535_batch_heads():
    """B x H = 4100 x 16 = 65600 rows: past the 65535 of a second grid axis."""
    q, k, v, do = _problem(20, 20, 16, 4, 16, torch.float16, seed=3, batch=4100)
    _check_block(q, k, v, do, 0.25, 0, tiles=(None, None))


# The attention and merge kernels compiled for sm_90 (see triton_compile.py) with the tile
# sizes the host wrappers use, folded launch grids included.
_COMPILE_SCRIPT = """
from seqpar.kernels.triton import attention as A, merge as M

def arg_type(name):
    if name in ("Q", "K", "V", "DO"):
        return "*bf16"
    if name[0].isupper():
        return "*fp32"
    return "fp32" if name in ("qk_scale", "scale") else "i32"

for head_dim in (64, 128):
    for kind, fn in (("fwd", A._attn_fwd), ("dkdv", A._attn_bwd_dkdv), ("dq", A._attn_bwd_dq)):
        bm, bn, warps, stages = A._tiles(kind, head_dim, torch.bfloat16)
        build(fn, dict(CAUSAL=True, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=bm, BLOCK_N=bn,
                       PRECISION="tf32"), arg_type, warps, stages)
    build(A._bwd_preprocess, dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=64), arg_type)
    build(M._merge_kernel, dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=32), arg_type)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu tests compile and run the kernels")
def test_kernels_compile_for_sm90():
    compile_for_sm90(_COMPILE_SCRIPT)


@pytest.mark.parametrize("softcap", [0.5, 5.0, 30.0])
@pytest.mark.parametrize("case", ["no-mask", "square-causal", "offset-negative", "gqa-3-groups", "one-row"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap_matches_reference(case, softcap, dtype, nan_empty):
    """Every score s becomes softcap * tanh(s / softcap) (Gemma 2): forward and backward
    against the torch math in float64 from the same rounded inputs. A large logit scale
    makes the cap bite."""
    b, nq, nk, heads, kv_heads, head_dim, offset = CASES[case]
    q, k, v, do = _problem(nq, nk, heads, kv_heads, head_dim, dtype, seed=7, batch=b)
    scale = 4.0 / head_dim ** 0.5
    q64, k64, v64, do64 = (t.double().cpu() for t in (q, k, v, do))
    ref_out, ref_lse = block.torch_forward(q64, k64, v64, scale, offset, None, softcap)
    ref_grads = block.torch_backward(do64, q64, k64, v64, ref_out, ref_lse, scale, offset, None, softcap)
    out, lse = triton_attention.forward(q, k, v, scale, offset, softcap=softcap, **TILES16)
    tol = TOLERANCE[dtype]
    assert _rel(out.cpu(), ref_out) <= tol
    finite = ~torch.isneginf(ref_lse)
    assert (lse.cpu()[finite].double() - ref_lse[finite]).abs().max().item() <= tol * max(1.0, ref_lse[finite].abs().max().item())
    grads = triton_attention.backward(do, q, k, v, ref_out.to(DEVICE, dtype), ref_lse.to(DEVICE).float(), scale,
                                      offset, softcap=softcap, **TILES16)
    for got, want in zip(grads, ref_grads):
        assert _rel(got.cpu(), want) <= 4 * tol
    # the cap changed the result: without it the numbers differ
    plain, _ = triton_attention.forward(q, k, v, scale, offset, **TILES16)
    assert softcap > 10 or _rel(plain.cpu(), ref_out) > 10 * tol


def test_tanh_is_accurate_everywhere():
    import triton
    import triton.language as tl

    @triton.jit
    def tanh_kernel(X, Y, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Y + offs, triton_attention._tanh(tl.load(X + offs)))

    x = torch.cat([torch.linspace(-30, 30, 4093), torch.tensor([0.0, 1e-30, -1e-8, 1.0, -1.0, float("inf"),
                                                                 -float("inf")])]).to(DEVICE)
    x = torch.cat([x, torch.zeros(4096 - x.numel(), device=DEVICE)]) if x.numel() < 4096 else x[:4096]
    y = torch.empty_like(x)
    tanh_kernel[(1,)](x, y, N=4096)
    want = torch.tanh(x.double())
    rel = ((y.double() - want).abs() / want.abs().clamp_min(1e-30)).max().item()
    assert rel <= 4e-7, rel  # a few fp32 ulps
