"""csrc/ without a GPU: every kernel compiles (nvcc, sm_80 and sm_90), the torch binding
compiles against torch's headers (g++ -fsyntax-only), the kernels' shared arithmetic runs
on the CPU through a host harness and matches the Python references, and setup.py's
SEQPAR_BUILD_CUDA modes behave. Tests that need nvcc or g++ skip, saying so, without them.
"""
import ctypes
import os
import runpy
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from seqpar.kernels import cuda_ext
from seqpar.kernels.merge import merge_

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
ARCHS = ("80", "90")


def _cuda_include():
    candidates = [Path(NVCC).resolve().parents[1] / "include"] if NVCC else []
    candidates += [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if v in os.environ]
    candidates.append(Path("/usr/local/cuda/include"))
    for path in candidates:
        if (path / "cuda_runtime_api.h").is_file():
            return path
    return None


CUDA_INCLUDE = _cuda_include()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA kernels cannot be compiled here")


def _failed(proc, what):
    return f"{what} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"


# -- compile --------------------------------------------------------------------------

LAUNCHERS = {"merge.cu": ["seqpar_merge"], "state.cu": ["seqpar_state_combine", "seqpar_state_scan"]}


def _binding_command(workdir: Path):
    """g++ -fsyntax-only of bindings.cpp against torch's headers, or the reason it cannot run."""
    from torch.utils.cpp_extension import include_paths

    if GXX is None or CUDA_INCLUDE is None:
        return "needs g++ and the CUDA toolkit's headers (cuda_runtime_api.h)"
    python_include = Path(sysconfig.get_paths()["include"])
    if not (python_include / "Python.h").is_file():
        return f"Python.h is not in {python_include} (no Python development headers)"
    torch_includes = [Path(p) for p in include_paths()]
    extra = []
    if not any((p / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in torch_includes):
        # CPU wheels ship c10/cuda's headers but not this generated one, which only says
        # whether c10_cuda is a shared library; CUDA wheels define exactly this
        stub = workdir / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        extra = ["-I", str(workdir / "stub")]
    cmd = [GXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", *extra, "-I", str(CSRC)]
    for path in [*torch_includes, CUDA_INCLUDE, python_include]:
        cmd += ["-isystem", str(path)]
    return cmd + [str(CSRC / "bindings.cpp")]


@pytest.fixture(scope="module")
def compile_jobs(tmp_path_factory):
    """Every compiler process of this module, started at once (2 cores: they overlap)."""
    workdir = tmp_path_factory.mktemp("csrc")
    jobs = {}

    def start(key, cmd, obj=None):
        jobs[key] = (obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))

    if NVCC is not None:
        gencode = [arg for arch in ARCHS for arg in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
        for src in sorted(CSRC.glob("*.cu")):
            obj = workdir / (src.stem + ".o")
            start(src.name, [NVCC, "-std=c++17", "-O3", "-Werror", "all-warnings", "-Xcompiler",
                             "-Wall,-Wextra,-Werror", *gencode, "-c", str(src), "-o", str(obj)], obj)
    binding = _binding_command(workdir)
    if isinstance(binding, str):
        jobs["bindings.cpp"] = (binding, None)
    else:
        start("bindings.cpp", binding)
    yield jobs
    for _, proc in jobs.values():
        if proc is not None and proc.poll() is None:
            proc.kill()


def _finish(job, what):
    obj, proc = job
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{out}{err}"
    return obj


@needs_nvcc
def test_every_cu_file_compiles_for_sm80_and_sm90(compile_jobs):
    sources = sorted(p.name for p in CSRC.glob("*.cu"))
    assert set(sources) >= set(LAUNCHERS)
    for name in sources:
        obj = _finish(compile_jobs[name], f"nvcc {name}")
        assert obj.stat().st_size > 0
        if shutil.which("nm"):
            symbols = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=False).stdout
            for launcher in LAUNCHERS.get(name, []):
                # the C launcher, unmangled, is what bindings.cpp links against
                assert f" T {launcher}\n" in symbols, f"{name} does not export {launcher} with C linkage"
        if shutil.which("cuobjdump"):
            elf = subprocess.run(["cuobjdump", "--list-elf", str(obj)], capture_output=True, text=True, check=False).stdout
            for arch in ARCHS:
                assert f"sm_{arch}" in elf, f"{name}: no sm_{arch} code in {elf!r}"


def test_binding_compiles_against_torch_headers(compile_jobs):
    reason, proc = compile_jobs["bindings.cpp"]
    if proc is None:
        pytest.skip(reason)
    _finish(compile_jobs["bindings.cpp"], "g++ -fsyntax-only bindings.cpp")


# -- the kernels' arithmetic on the CPU -------------------------------------------------

I64 = ctypes.c_int64
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


class MergeArgs(ctypes.Structure):
    _fields_ = [
        ("batch", I64), ("rows", I64), ("heads", I64), ("head_dim", I64),
        ("out", ctypes.c_void_p), ("out_stride", I64 * 4),
        ("lse", ctypes.c_void_p), ("lse_dtype", ctypes.c_int), ("lse_stride", I64 * 3),
        ("part_out", ctypes.c_void_p), ("part_dtype", ctypes.c_int), ("part_stride", I64 * 4),
        ("part_lse", ctypes.c_void_p), ("part_lse_stride", I64 * 3),
    ]


class CombineArgs(ctypes.Structure):
    _fields_ = [
        ("batch", I64), ("heads", I64), ("dk", I64), ("dv", I64), ("row_start", I64), ("row_end", I64),
        ("out", ctypes.c_void_p), ("out_stride", I64 * 4),
        ("s_in", ctypes.c_void_p), ("in_stride", I64 * 4),
        ("s_local", ctypes.c_void_p), ("local_stride", I64 * 4),
        ("log_decay", ctypes.c_void_p), ("decay_stride", I64 * 2),
    ]


class ScanArgs(ctypes.Structure):
    _fields_ = [
        ("chunks", I64), ("batch", I64), ("heads", I64), ("dk", I64), ("dv", I64),
        ("out", ctypes.c_void_p), ("out_stride", I64 * 5),
        ("states", ctypes.c_void_p), ("states_stride", I64 * 5),
        ("log_decay", ctypes.c_void_p), ("decay_stride", I64 * 3),
    ]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    if GXX is None or CUDA_INCLUDE is None:
        pytest.skip("needs g++ and the CUDA toolkit's headers (cuda_fp16.h) to build the host harness")
    lib = tmp_path_factory.mktemp("harness") / "harness.so"
    cmd = [GXX, "-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", "-I", str(CSRC),
           "-isystem", str(CUDA_INCLUDE), str(Path(__file__).with_name("host_harness.cpp")), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, _failed(proc, "g++ host_harness.cpp")
    h = ctypes.CDLL(str(lib))
    for name, struct in (("merge", MergeArgs), ("state_combine", CombineArgs), ("state_scan", ScanArgs)):
        getattr(h, f"seqpar_host_sizeof_{name}_args").restype = I64
        # the ctypes mirror must match the C struct of csrc/seqpar_kernels.h field for field
        assert getattr(h, f"seqpar_host_sizeof_{name}_args")() == ctypes.sizeof(struct), name
        getattr(h, f"seqpar_host_{name}").argtypes = [ctypes.POINTER(struct)]
    return h


def _strides(t, n):
    return (I64 * n)(*t.stride())


def _heads_major(shape, dtype):
    """[B, n, H, D] view of [B, H, n, D]-contiguous storage (the ring's sdpa accumulator)."""
    b, n, h, d = shape
    return torch.empty(b, h, n, d, dtype=dtype).transpose(1, 2)


def _merge_inputs(gen, d, lse_dtype, part_dtype):
    """A view of a larger heads-major accumulator, a transposed part and -inf rows of every kind."""
    b, n, h = 2, 6, 3
    acc = _heads_major((b, n + 4, h, d), torch.float32)
    acc.copy_(torch.randn(acc.shape, generator=gen))
    acc_lse = torch.randn(b, h, n + 4, generator=gen).to(lse_dtype) * 5
    out, lse = acc[:, 2:2 + n], acc_lse[:, :, 2:2 + n]
    part = torch.randn(b, h, n, d, generator=gen).to(part_dtype).transpose(1, 2)  # strided part
    part_lse = torch.randn(b, h, n, generator=gen) * 5
    inf = float("-inf")
    lse[:, :, 0] = inf  # accumulator row that saw no key
    out[:, 0] = 0
    part_lse[:, :, 1] = inf  # part row that saw no key
    lse[:, :, 2], part_lse[:, :, 2] = inf, inf  # neither
    out[:, 2] = 0
    part_lse[:, :, 3] = lse[:, :, 3].float()  # equal weights
    part_lse[:, :, 4] = float("nan")  # NaN in, NaN out, from either side
    lse[:, :, 5] = float("nan")
    return out, lse, part, part_lse


@pytest.mark.parametrize("head_dim", [0, 1, 5, 32, 33, 80])
@pytest.mark.parametrize("lse_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("part_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_host_merge_matches_merge_py(harness, head_dim, lse_dtype, part_dtype):
    gen = torch.Generator().manual_seed(head_dim)
    out, lse, part, part_lse = _merge_inputs(gen, head_dim, lse_dtype, part_dtype)
    want_out, want_lse = out.clone(), lse.clone()
    merge_(want_out, want_lse, part, part_lse)
    base_out, base_lse = out._base.clone(), lse._base.clone()  # elements outside the views
    b, n, h, d = out.shape
    args = MergeArgs(b, n, h, d, out.data_ptr(), _strides(out, 4), lse.data_ptr(), DTYPE_CODE[lse_dtype],
                     _strides(lse, 3), part.data_ptr(), DTYPE_CODE[part_dtype], _strides(part, 4),
                     part_lse.data_ptr(), _strides(part_lse, 3))
    assert harness.seqpar_host_merge(ctypes.byref(args)) == 0
    tol = 1e-13 if lse_dtype == torch.float64 else 2e-6
    torch.testing.assert_close(lse, want_lse, rtol=tol, atol=tol, equal_nan=True)
    torch.testing.assert_close(out, want_out, rtol=2e-6, atol=2e-6, equal_nan=True)
    assert torch.isneginf(lse[:, :, 2]).all() and torch.isfinite(out[:, :4]).all()
    assert torch.isnan(lse[:, :, 4:]).all() and (d == 0 or torch.isnan(out[:, 4:]).all())
    # nothing outside the views was written
    torch.testing.assert_close(out._base[:, :, :2], base_out[:, :, :2], rtol=0, atol=0)
    torch.testing.assert_close(out._base[:, :, 2 + n:], base_out[:, :, 2 + n:], rtol=0, atol=0)
    torch.testing.assert_close(lse._base[:, :, 2 + n:], base_lse[:, :, 2 + n:], rtol=0, atol=0)


def test_host_merge_rejects_unknown_dtype_codes(harness):
    t = torch.zeros(1, 1, 1, 1)
    args = MergeArgs(1, 1, 1, 1, t.data_ptr(), _strides(t, 4), t.data_ptr(), 7, (I64 * 3)(1, 1, 1),
                     t.data_ptr(), 0, _strides(t, 4), t.data_ptr(), (I64 * 3)(1, 1, 1))
    assert harness.seqpar_host_merge(ctypes.byref(args)) == 1


def _combine_args(out, s_in, s_local, g, r0, r1):
    b, h, dk, dv = out.shape
    return CombineArgs(b, h, dk, dv, r0, r1, out.data_ptr(), _strides(out, 4), s_in.data_ptr(), _strides(s_in, 4),
                       s_local.data_ptr(), _strides(s_local, 4), g.data_ptr(), _strides(g, 2))


@pytest.mark.parametrize("rows", [(0, 7), (2, 5), (3, 3)])
def test_host_state_combine_rows(harness, rows):
    gen = torch.Generator().manual_seed(1)
    b, h, dk, dv = 2, 3, 7, 5
    s_in = torch.randn(b, h, dv, dk, generator=gen).transpose(2, 3)  # strided
    s_local = torch.randn(b, h, dk, dv, generator=gen)
    g = -torch.rand(h, b, generator=gen).t() * 3  # strided [B, H], values <= 0
    out = torch.full((b, h, dk, dv), float("nan"))
    r0, r1 = rows
    assert harness.seqpar_host_state_combine(ctypes.byref(_combine_args(out, s_in, s_local, g, r0, r1))) == 0
    want = cuda_ext.state_combine_reference(s_in, s_local, g)
    torch.testing.assert_close(out[:, :, r0:r1], want[:, :, r0:r1], rtol=1e-6, atol=1e-6)
    untouched = torch.ones(dk, dtype=torch.bool)
    untouched[r0:r1] = False
    assert torch.isnan(out[:, :, untouched]).all()


def test_host_state_combine_in_place_on_s_in(harness):
    gen = torch.Generator().manual_seed(2)
    s_in, s_local = torch.randn(2, 2, 4, 3, generator=gen), torch.randn(2, 2, 4, 3, generator=gen)
    g = -torch.rand(2, 2, generator=gen)
    want = cuda_ext.state_combine_reference(s_in, s_local, g)
    assert harness.seqpar_host_state_combine(ctypes.byref(_combine_args(s_in, s_in, s_local, g, 0, 4))) == 0
    torch.testing.assert_close(s_in, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunks", [1, 4])
@pytest.mark.parametrize("in_place", [False, True])
def test_host_state_scan(harness, chunks, in_place):
    gen = torch.Generator().manual_seed(chunks)
    c, b, h, dk, dv = chunks, 2, 3, 4, 5
    states = torch.randn(c, b, h, dv, dk, generator=gen).transpose(3, 4)  # strided
    g = -torch.rand(c, b, h, generator=gen) * 2
    want = cuda_ext.state_scan_reference(states, g)
    out = states if in_place else torch.full((c, b, h, dk, dv), float("nan"))
    args = ScanArgs(c, b, h, dk, dv, out.data_ptr(), _strides(out, 5), states.data_ptr(), _strides(states, 5),
                    g.data_ptr(), _strides(g, 3))
    assert harness.seqpar_host_state_scan(ctypes.byref(args)) == 0
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


# -- setup.py ---------------------------------------------------------------------------

def _run_setup(monkeypatch, mode):
    """setup.py's extension decision, with setuptools.setup captured instead of run."""
    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.setenv("SEQPAR_BUILD_CUDA", mode)
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"))
    return captured


def test_setup_without_cuda_torch(monkeypatch):
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    assert _run_setup(monkeypatch, "auto")["ext_modules"] == []  # skipped quietly
    assert _run_setup(monkeypatch, "0")["ext_modules"] == []
    with pytest.raises(RuntimeError, match="SEQPAR_BUILD_CUDA=1 .* not a CUDA build"):
        _run_setup(monkeypatch, "1")
    with pytest.raises(RuntimeError, match="SEQPAR_BUILD_CUDA: expected one of .* got 'yes'"):
        _run_setup(monkeypatch, "yes")


def test_setup_with_cuda_torch_builds_every_source(monkeypatch):
    from torch.utils import cpp_extension

    if CUDA_INCLUDE is None:
        pytest.skip("no CUDA toolkit here to point CUDA_HOME at")
    # as a CUDA build of torch with a toolkit would present itself
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(CUDA_INCLUDE.parent))
    for mode in ("auto", "1"):
        (ext,) = _run_setup(monkeypatch, mode)["ext_modules"]
        assert ext.name == "seqpar._C"
        assert sorted(ext.sources) == sorted(f"csrc/{p.name}" for p in CSRC.iterdir() if p.suffix in (".cu", ".cpp"))
    assert _run_setup(monkeypatch, "0")["ext_modules"] == []
