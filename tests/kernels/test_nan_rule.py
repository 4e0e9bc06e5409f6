"""The NaN rule of block.py on every CPU-testable backend and block size: NaN in, NaN out in
every row that depends on it, through the block kernels and the merges."""
import pytest
import torch

from seqpar.kernels import backends
from seqpar.kernels.merge import merge_

NAN = float("nan")


def _forward(backend):
    if backend == "triton":
        from seqpar.kernels.triton import attention as triton_attention

        return triton_attention.forward
    return backends.get(backend).forward


BACKEND_DTYPES = [("torch", torch.float64), ("sdpa", torch.float64), ("sdpa", torch.float32),
                  ("triton", torch.float32)]


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("offset", [None, 0, -2])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_reaches_every_row_that_depends_on_it(backend, dtype, offset, where):
    fwd = _forward(backend)
    gen = torch.Generator().manual_seed(0)
    for n in range(1, 10):  # the CPU flash op lost NaN rows below one vector of keys
        q, k, v = (torch.randn(1, n, h, 8, generator=gen).to(dtype) for h in (4, 2, 2))
        j = n // 2
        {"q": q, "k": k, "v": v}[where][0, j, 0, 3] = NAN
        out, lse = fwd(q, k, v, 8 ** -0.5, offset)
        rows = torch.arange(n)
        sees_key = torch.ones(n, dtype=torch.bool) if offset is None else rows + offset >= 0
        # query head 0 reads KV head 0; with GQA (2 query heads per KV head) heads 0 and 1 do
        heads = [0] if where == "q" else [0, 1]
        if where == "q":
            depends = (rows == j) & sees_key
        else:
            depends = torch.ones(n, dtype=torch.bool) if offset is None else j <= rows + offset
        for h in heads:
            got_out = out[0, :, h].isnan().any(-1)
            assert torch.equal(got_out & depends, depends), (
                f"n={n} head {h}: rows {depends.nonzero().flatten().tolist()} must be NaN, NaN rows "
                f"{got_out.nonzero().flatten().tolist()}")
            if where in ("q", "k"):
                got_lse = lse[0, h].isnan()
                assert torch.equal(got_lse & depends, depends), f"n={n} head {h}: lse NaN rows {got_lse.tolist()}"
        if where in ("q", "k"):
            # the rows that do not depend on the NaN stay finite (the other KV head, other rows)
            other = out[0, :, 2:] if where == "k" else out[0, ~depends, 0]
            assert torch.isfinite(other).all(), f"n={n}: a row that does not depend on the NaN is not finite"


def _merges():
    yield "torch", merge_
    from seqpar.kernels.triton.merge import merge_ as triton_merge

    yield "triton", triton_merge


@pytest.mark.parametrize("name, merge", list(_merges()))
@pytest.mark.parametrize("nan_in", ["acc_lse", "part_lse", "acc_out", "part_out"])
def test_merge_keeps_a_nan_row_nan(name, merge, nan_in):
    gen = torch.Generator().manual_seed(1)
    out, part_out = (torch.randn(1, 3, 2, 8, generator=gen) for _ in range(2))
    lse, part_lse = (torch.randn(1, 2, 3, generator=gen) for _ in range(2))
    # row 2 of head 1 saw no key on either side: must stay 0 / -inf, not NaN
    out[0, 2, 1], part_out[0, 2, 1], lse[0, 1, 2], part_lse[0, 1, 2] = 0.0, 0.0, float("-inf"), float("-inf")
    target = {"acc_lse": lse, "part_lse": part_lse, "acc_out": out, "part_out": part_out}[nan_in]
    if nan_in.endswith("lse"):
        target[0, 0, 1] = NAN  # head 0, row 1
    else:
        target[0, 1, 0, 5] = NAN
    merge(out, lse, part_out, part_lse)
    assert out[0, 1, 0].isnan().any(), f"{name}: merged row with a NaN {nan_in} is finite: {out[0, 1, 0].tolist()}"
    if nan_in.endswith("lse"):
        assert lse[0, 0, 1].isnan(), f"{name}: merged lse of a NaN {nan_in} is {lse[0, 0, 1].item()}"
    finite_rows = torch.ones(3, 2, dtype=torch.bool)
    finite_rows[1, 0] = False
    assert torch.isfinite(out[0][finite_rows]).all(), f"{name}: a NaN {nan_in} leaked into other rows"
    assert torch.equal(out[0, 2, 1], torch.zeros(8)) and lse[0, 1, 2] == float("-inf")
