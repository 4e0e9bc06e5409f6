"""torch.distributed only, no attention math: exchanges, collectives, checks, accounting."""
from .deferred import set_value_checks
from .groups import new_group, set_validation
from .stats import CommStats, track
from .timeout import CommError, CommTimeout, get_timeout, set_timeout

__all__ = ["CommStats", "track", "new_group", "set_validation", "set_value_checks", "CommError", "CommTimeout", "set_timeout", "get_timeout"]
