"""Only the optional compiled extension lives here; all metadata is in pyproject.toml.

The extension `seqpar._C` holds the CUDA kernels of csrc/ (see csrc/README.md).
SEQPAR_BUILD_CUDA=0 never builds it; 1 requires it and fails with the reason when it
cannot be built; auto (the default) builds it when torch is a CUDA build and finds a CUDA
toolkit, and otherwise skips it quietly. A plain install never needs nvcc.
"""
import glob
import os

from setuptools import setup

_MODES = ("0", "1", "auto")


def _cuda_unbuildable_reason():
    """Why the extension cannot be built here, or None when it can."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError as exc:
        return f"torch is not importable at build time ({exc}); install torch first and build with --no-build-isolation"
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None); "
                "install a CUDA build of torch")
    if CUDA_HOME is None:
        return "no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)"
    return None


def _ext_modules():
    mode = os.environ.get("SEQPAR_BUILD_CUDA", "auto").lower()
    if mode not in _MODES:
        raise RuntimeError(f"SEQPAR_BUILD_CUDA: expected one of {_MODES}, got {mode!r}")
    if mode == "0":
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    reason = None if sources else "csrc/ holds no .cu or .cpp sources"
    reason = reason or _cuda_unbuildable_reason()
    if reason is not None:
        if mode == "1":
            raise RuntimeError(f"SEQPAR_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # no --use_fast_math: the merge must round like torch's formula (csrc/seqpar_math.cuh)
    ext = CUDAExtension(
        "seqpar._C", sources, include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
