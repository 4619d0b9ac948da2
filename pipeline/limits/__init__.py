"""Named limits shared by the whole fleet: requests and tokens a minute (GCRA on Redis
server time), calls at once (leases that run out), drawn on with a ``Limiter``."""

from .limiter import Admission, Limiter
from .policy import Limit, limit, limits

__all__ = ["Admission", "Limit", "Limiter", "limit", "limits"]
