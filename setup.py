"""Only the optional compiled extension lives here; all metadata is in pyproject.toml.

SEQPAR_BUILD_CUDA=0 never builds it, 1 requires it, auto (the default) builds it when
torch sees a CUDA toolkit and csrc/ holds sources. A plain install never needs nvcc.
"""
import glob
import os

from setuptools import setup


def _ext_modules():
    mode = os.environ.get("SEQPAR_BUILD_CUDA", "auto").lower()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if mode == "0" or not sources:
        if mode == "1":
            raise RuntimeError("SEQPAR_BUILD_CUDA=1 but csrc/ holds no sources")
        return [], {}
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if mode == "1":
            raise
        return [], {}
    if CUDA_HOME is None:
        if mode == "1":
            raise RuntimeError("SEQPAR_BUILD_CUDA=1 but no CUDA toolkit was found")
        return [], {}
    ext = CUDAExtension("seqpar._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
