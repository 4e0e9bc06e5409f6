"""One file per algorithm; each registers its `Strategy` record (`seqpar.registry`) when
imported. A new exact strategy is one file plus one line here. The order of the lines is
the registry's order (the benchmark's rows, the plan table's listing)."""
from . import ring  # noqa: F401  isort: skip
from . import ulysses  # noqa: F401  isort: skip
from . import usp  # noqa: F401  isort: skip
from . import token_ring  # noqa: F401  isort: skip
from . import allgather  # noqa: F401  isort: skip
