"""Compile Triton kernels for sm_90 offline, in a fresh process without the interpreter.

The interpreter accepts code the compiler rejects (loop-carried types, dot shapes, int
widths, shared memory); triton's bundled ptxas compiles for a GPU this machine lacks. A
script given to `compile_for_sm90` has `triton`, `torch` and `build(fn, constexprs,
arg_type, warps=4, stages=1)` in scope; the test skips when ptxas is missing.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

_PREAMBLE = """
import sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
try:
    from triton.backends.nvidia.compiler import get_ptxas
    get_ptxas(90).path
except Exception as exc:
    print(f"no ptxas: {exc}")
    sys.exit(77)

def build(fn, consts, arg_type, warps=4, stages=1):
    sig = {a: "constexpr" if a in consts else arg_type(a) for a in fn.arg_names}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": warps, "num_stages": stages})
"""


def compile_for_sm90(script: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-c", _PREAMBLE + script], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-4000:]
