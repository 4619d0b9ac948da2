"""How the fleet's limits stand, read from Redis (``pipeline limits``): every limit drawn on
lately (a limit's keys go two idle minutes after its last call), as its callers define it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from ..keys import limit_keys
from ..lua import Client, decoding_client
from ..state import translate_errors
from .policy import WINDOW_S

__all__ = ["LimitState", "limit_states", "named_limit_states"]

PATTERN = "pipeline:limit:{*}"


@dataclass(frozen=True, slots=True)
class LimitState:
    """One limit now: its definition, what its window holds, what is in flight, refusals."""

    name: str
    requests_per_minute: float | None
    tokens_per_minute: float | None
    concurrency: int | None
    requests_in_window: float
    """Requests the current minute holds (the rate's time ahead of now, in requests)."""
    tokens_in_window: float
    in_flight: int
    """Calls admitted and not settled, their leases not run out."""
    tokens_reserved: int
    debt_s: float
    """How far the token rate's time runs past a whole window: an overrun still owed."""
    throttled: int
    throttled_s: float
    factor: float = 1.0
    """What the API's refusals left of the rates and concurrency (1: all of them)."""
    rate_limited: int = 0
    """Calls the API refused (``RateLimited``, a 429) that slowed the limit down."""
    blocked_s: float = 0.0
    """How long every call still waits for the API's last Retry-After."""

    @property
    def effective_requests_per_minute(self) -> float | None:
        return None if self.requests_per_minute is None \
            else self.requests_per_minute * self.factor

    @property
    def effective_tokens_per_minute(self) -> float | None:
        return None if self.tokens_per_minute is None else self.tokens_per_minute * self.factor

    @property
    def effective_concurrency(self) -> int | None:
        return None if self.concurrency is None \
            else max(1, int(self.concurrency * self.factor))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "effective": {
            "requests_per_minute": self.effective_requests_per_minute,
            "tokens_per_minute": self.effective_tokens_per_minute,
            "concurrency": self.effective_concurrency}}


def _rate(ms_per: float) -> float | None:
    return WINDOW_S * 1000 / ms_per if ms_per > 0 else None


def limit_states(client: Client, *, url: str = "") -> list[LimitState]:
    """Every limit with keys in Redis, by name."""
    redis = decoding_client(client, "limit_states")
    with translate_errors(url):
        names = sorted({k[len("pipeline:limit:{"):-1] for k in redis.scan_iter(PATTERN)
                        if k.endswith("}")})
    return [state for state in named_limit_states(client, names, url=url) if state is not None]


def named_limit_states(client: Client, names: Iterable[str], *,
                       url: str = "") -> list[LimitState | None]:
    """The state of each limit named (None for one not drawn on lately), without a SCAN:
    what the exporter reads of the limits its process defines, at every scrape."""
    redis = decoding_client(client, "limit_states")
    out: list[LimitState | None] = []
    with translate_errors(url):
        seconds, micros = redis.time()
        now = seconds * 1000 + micros / 1000
        for name in names:  # each limit's keys share a slot: one pipeline each
            base, leases, reserved = limit_keys(name)
            pipe = redis.pipeline(transaction=False)
            pipe.hgetall(base)
            pipe.zcount(leases, now, "+inf")
            pipe.hvals(reserved)
            h, flying, held = pipe.execute()
            out.append(_state(name, h, int(flying), held, now) if h else None)
    return out


def _state(name: str, h: dict[str, str], flying: int, held: list[str],
           now: float) -> LimitState:
    ms_req, ms_tok = float(h.get("ms_per_request") or 0), float(h.get("ms_per_token") or 0)
    ahead_req = max(0.0, float(h.get("requests") or now) - now)
    ahead_tok = max(0.0, float(h.get("tokens") or now) - now)
    concurrency = int(h.get("concurrency") or 0)
    return LimitState(
        name=name,
        requests_per_minute=_rate(ms_req),
        tokens_per_minute=_rate(ms_tok),
        concurrency=concurrency or None,
        requests_in_window=ahead_req / ms_req if ms_req else 0.0,
        tokens_in_window=min(ahead_tok, WINDOW_S * 1000) / ms_tok if ms_tok else 0.0,
        in_flight=flying,
        tokens_reserved=sum(int(v) for v in held),
        debt_s=max(0.0, ahead_tok - WINDOW_S * 1000) / 1000,
        throttled=int(h.get("throttled") or 0),
        throttled_s=int(h.get("throttled_ms") or 0) / 1000,
        factor=float(h.get("factor") or 1.0),
        rate_limited=int(h.get("rate_limited") or 0),
        blocked_s=max(0.0, float(h.get("blocked_until") or 0) - now) / 1000,
    )
