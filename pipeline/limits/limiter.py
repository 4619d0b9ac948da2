"""Drawing on a named limit from anywhere in the fleet: admit a call or say how long to
wait (``acquire.lua``), and settle it once it ended (``settle.lua``), each one round trip
on Redis server time, exact however many processes and threads draw at once.

A call holds a lease from its admission to its settlement: one per attempt, so admitting
the same lease again charges nothing and settling it twice settles once. A lease whose
holder died runs out after ``lease_s``: its concurrency slot comes back, and the tokens it
reserved stay spent (what the call used is unknown, so the limit errs on the safe side).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import RateLimited, Throttled
from ..keys import limit_keys
from ..lua import Arg, Batch, Client, Script, checked, decoding_client
from ..state import translate_errors
from .policy import WINDOW_S, Limit, limits

__all__ = ["DEFAULT_LEASE_S", "MIN_RATE_LIMITED_WAIT_S", "Admission", "Limiter"]

ACQUIRE = Script("pipeline.limits", "acquire.lua")
SETTLE = Script("pipeline.limits", "settle.lua")

DEFAULT_LEASE_S = 60.0
DEFAULT_MAX_WAIT_S = 60.0
MIN_RATE_LIMITED_WAIT_S = 1.0
"""The least a call refused by its API (``RateLimited``) waits, when no Retry-After says."""
RECOVERY_STEP = 0.05
"""After the API refused calls (``RateLimited``) the limit's rates and concurrency are
halved; each call that succeeds gives back this much of the whole, up to all of it."""

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Admission:
    """What the limit said to one call: admitted, or wait ``wait_s`` for ``reason``
    (requests, tokens or concurrency); ``never`` when one call costs more than the limit
    admits in a whole window."""

    admitted: bool
    wait_s: float = 0.0
    reason: str = ""
    never: bool = False


class Limiter:
    """One named limit (a ``Limit``, or the name of one registered with ``limit``)."""

    def __init__(self, client: Client, limit: Limit | str, *, lease_s: float = DEFAULT_LEASE_S,
                 max_wait_s: float = DEFAULT_MAX_WAIT_S, url: str = "") -> None:
        self.redis = decoding_client(client, "Limiter")
        self.limit = limits.get(limit) if isinstance(limit, str) else limit
        self.lease_s = lease_s
        self.max_wait_s = max_wait_s
        self.url = url
        self._keys = limit_keys(self.limit.name)

    def acquire(self, lease: str, *, tokens: int = 0) -> Admission:
        """Admit the call holding ``lease``, reserving ``tokens`` (its estimate), or say how
        long to wait."""
        with translate_errors(self.url):
            reply = ACQUIRE(self.redis, self._keys, self._acquire_args(lease, tokens))
        return self.admission(reply)

    def settle(self, lease: str, *, tokens: int = 0, cancel: bool = False, outcome: str = "",
               retry_after_s: float = 0.0) -> bool:
        """End the call holding ``lease``, which used ``tokens``: its slot comes back and
        its reservation is charged the difference; ``cancel``, the call was never made, and
        its request is given back too. ``outcome`` adapts the limit: ``"ok"`` (the call
        succeeded: it recovers a step), ``"limited"`` (the API refused it: its rates and
        concurrency are halved, and every call waits ``retry_after_s``). False when there
        was nothing to settle (settled before, or its lease ran out)."""
        args = self._settle_args(lease, tokens, cancel, outcome, retry_after_s)
        with translate_errors(self.url):
            reply = SETTLE(self.redis, self._keys, args)
        return bool(reply[0] == "settled")

    # -- the same, queued on a round trip of the caller's (a step's open and seal) -------

    def queue_acquire(self, batch: Batch, lease: str, *, tokens: int = 0) -> int:
        return batch.script(ACQUIRE, self._keys, self._acquire_args(lease, tokens))

    def queue_settle(self, batch: Batch, lease: str, *, tokens: int = 0, cancel: bool = False,
                     outcome: str = "", retry_after_s: float = 0.0) -> int:
        return batch.script(SETTLE, self._keys,
                            self._settle_args(lease, tokens, cancel, outcome, retry_after_s))

    @staticmethod
    def admission(reply: Any) -> Admission:
        """``acquire.lua``'s reply, read (an error queued in a batch is raised)."""
        reply = checked(reply)
        if reply[0] == "ok":
            return Admission(True)
        if reply[0] == "never":
            return Admission(False, reason=reply[1], never=True)
        return Admission(False, wait_s=int(reply[1]) / 1000.0, reason=reply[2])

    def _acquire_args(self, lease: str, tokens: int) -> list[Arg]:
        lim = self.limit
        return [lease, lim.ms_per_request, lim.ms_per_token, lim.concurrency or 0,
                max(0, int(tokens)), int(self.lease_s * 1000), int(WINDOW_S * 1000),
                lim.burst_ms]

    def _settle_args(self, lease: str, tokens: int, cancel: bool, outcome: str,
                     retry_after_s: float) -> list[Arg]:
        lim = self.limit
        return [lease, lim.ms_per_token, max(0, int(tokens)),
                lim.ms_per_request if cancel else 0, outcome, int(retry_after_s * 1000),
                RECOVERY_STEP]

    def call(self, fn: Callable[..., T], *args: Any, tokens: int = 0,
             usage: Callable[[T], int] | None = None, **kwargs: Any) -> T:
        """Call ``fn(*args, **kwargs)`` once the limit admits it, waiting as long as the
        limit says (at most ``max_wait_s`` in all, else ``Throttled``). ``tokens`` is the
        call's estimate; ``usage(result)``, when given, what it really used (settled
        against the estimate). A call that raises is settled with its estimate; one that
        raises ``RateLimited`` (the API's 429) slows the limit down for the whole fleet
        and is made again once the limit and the API's Retry-After allow."""
        waited = 0.0
        while True:
            lease = uuid.uuid4().hex
            waited += self._wait_for(lease, tokens, waited)
            try:
                result = fn(*args, **kwargs)
            except RateLimited as e:  # every caller waits it out: the next acquire says how long
                self.settle(lease, tokens=tokens, outcome="limited",
                            retry_after_s=e.retry_after_s or MIN_RATE_LIMITED_WAIT_S)
                continue
            except BaseException:
                self.settle(lease, tokens=tokens)
                raise
            used = tokens
            try:
                if usage is not None:
                    used = int(usage(result))
            finally:
                self.settle(lease, tokens=used, outcome="ok")
            return result

    def _wait_for(self, lease: str, tokens: int, waited: float) -> float:
        """Sleep until the limit admits ``lease``; the seconds slept."""
        slept = 0.0
        while not (admission := self.acquire(lease, tokens=tokens)).admitted:
            name = self.limit.name
            if admission.never:
                raise Throttled(f"limit {name}: a call of {tokens} tokens can never pass it "
                                f"(more {admission.reason} than it admits in "
                                f"{WINDOW_S:g} s)", reason=admission.reason)
            if waited + slept + admission.wait_s > self.max_wait_s:
                raise Throttled(f"limit {name}: waited {waited + slept:.1f} s for "
                                f"{admission.reason}, and it asks {admission.wait_s:.1f} s "
                                f"more, past max_wait_s={self.max_wait_s:g}",
                                wait_s=admission.wait_s, reason=admission.reason)
            time.sleep(admission.wait_s)
            slept += admission.wait_s
        return slept
