"""Named limits shared by the whole fleet: requests and tokens a minute (GCRA on Redis
server time), calls at once (leases that run out), drawn on with a ``Limiter``."""

from .limiter import Admission, Limiter
from .policy import Limit, limit, limits
from .state import LimitState, limit_states, named_limit_states

__all__ = ["Admission", "Limit", "LimitState", "Limiter", "limit", "limit_states", "limits",
           "named_limit_states"]
