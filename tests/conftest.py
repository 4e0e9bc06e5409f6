"""Hypothesis profiles and the shared local worlds.

Profiles: "ci" (default; at least 200 ring problems over all schemes, bounded time) and
"local" (10x the examples): `pytest --hypothesis-profile=local`.
"""
import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    # Triton kernels run on cpu only in Triton's interpreter, which triton reads when a
    # kernel is decorated: set it before anything imports seqpar's triton kernels.
    # LocalWorld ranks are spawned processes and inherit it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# What a test sees must not depend on this machine's state: no calibration cached by an
# earlier run (strategy="auto" would plan with it), no LOCAL_WORLD_SIZE from a launcher
# (USP's default reads it), and one thread per rank whatever the core count (the reduction
# order of a multi-threaded BLAS differs by machine). Local worlds are spawned processes
# and inherit all three.
os.environ["SEQPAR_CACHE_DIR"] = tempfile.mkdtemp(prefix="seqpar-test-cache-")
os.environ.pop("LOCAL_WORLD_SIZE", None)
os.environ.setdefault("SEQPAR_THREADS_PER_RANK", "1")

settings.register_profile(
    "ci", max_examples=72, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "local", max_examples=720, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
