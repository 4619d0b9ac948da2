"""A named limit: requests and tokens a minute, calls at once, shared by the whole fleet.

``limit("openai:gpt-4o", requests_per_minute=500, tokens_per_minute=30_000,
concurrency=16)`` (any subset) defines one and registers it in ``limits``, as an agent
registers itself; a name defined twice must be defined alike. The limit's state lives in
Redis under its own hash tag (``keys.limit_keys``), so every worker and every
``Limiter`` of the fleet draws on the same one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import ConfigurationError, DefinitionError, UnknownLimit
from ..registry import Registry

__all__ = ["WINDOW_S", "Limit", "LimitRegistry", "limit", "limits"]

WINDOW_S = 60.0
"""Rates are per minute, and at most a minute's worth is admitted at once (the burst)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Limit:
    """One named limit; ``None`` leaves that side unlimited."""

    name: str
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    concurrency: int | None = None
    burst: int | None = None
    """Requests admitted at once, ahead of the rate (default: a whole minute's worth, as a
    provider's per-minute limit allows); ``burst=1`` spaces every request evenly."""
    price_per_1k_prompt: float | None = None
    price_per_1k_completion: float | None = None
    """What 1,000 tokens cost (in the unit of the runs' cost budgets): the prices turn a
    step's token usage into cost."""

    def __post_init__(self) -> None:
        where = f"limit {self.name!r}"
        if not self.name or any(c in self.name for c in "{}") or self.name != self.name.strip():
            raise DefinitionError(f"{where}: a limit's name is a non-empty string without "
                                  "braces or surrounding spaces (it becomes a Redis hash tag)")
        for field in ("requests_per_minute", "tokens_per_minute"):
            _check_number(where, field, getattr(self, field), least=1,
                          rule="a number from 1 (rates are per minute: one call a minute at least)")
        for field in ("price_per_1k_prompt", "price_per_1k_completion"):
            _check_number(where, field, getattr(self, field), least=0, rule="a number >= 0")
        if self.burst is not None and (isinstance(self.burst, bool)
                                       or not isinstance(self.burst, int) or self.burst < 1
                                       or self.requests_per_minute is None):
            raise DefinitionError(f"{where}: burst={self.burst!r} must be a whole number from "
                                  "1, with a requests_per_minute")
        if self.concurrency is not None and (isinstance(self.concurrency, bool)
                                             or not isinstance(self.concurrency, int)
                                             or self.concurrency < 1):
            raise DefinitionError(f"{where}: concurrency={self.concurrency!r} must be a whole "
                                  "number from 1")
        if (self.requests_per_minute, self.tokens_per_minute, self.concurrency) \
                == (None, None, None):
            raise DefinitionError(f"{where}: give requests_per_minute, tokens_per_minute or "
                                  "concurrency (or several)")

    @property
    def priced(self) -> bool:
        return self.price_per_1k_prompt is not None or self.price_per_1k_completion is not None

    @property
    def ms_per_request(self) -> float:
        """GCRA's interval for one request, ms (0: no request rate)."""
        return WINDOW_S * 1000 / self.requests_per_minute if self.requests_per_minute else 0.0

    @property
    def burst_ms(self) -> float:
        """How far ahead of now the request rate's time may run (GCRA's tolerance), ms."""
        if self.burst is None or not self.requests_per_minute:
            return WINDOW_S * 1000
        return min(self.burst * self.ms_per_request, WINDOW_S * 1000)

    @property
    def ms_per_token(self) -> float:
        """GCRA's interval for one token, ms (0: no token rate)."""
        return WINDOW_S * 1000 / self.tokens_per_minute if self.tokens_per_minute else 0.0


def _check_number(where: str, field: str, value: object, *, least: float, rule: str) -> None:
    """``DefinitionError`` unless ``value`` is None or a finite number of at least ``least``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                              or not math.isfinite(value) or value < least):
        raise DefinitionError(f"{where}: {field}={value!r} must be {rule}")


class LimitRegistry(Registry[Limit]):
    """The limits this process defined, by name."""

    def register(self, new: Limit) -> Limit:
        known = self._find(new.name)
        if known is None:
            return self._put(new.name, new)
        if known != new:
            raise DefinitionError(f"limit {new.name!r} is defined twice, differently: "
                                  f"{known} and {new}")
        return known

    def require(self, names: Iterable[str], who: str) -> None:
        """``ConfigurationError`` unless every limit ``who`` draws on is defined here."""
        unknown = [name for name in names if name not in self]
        if unknown:
            raise ConfigurationError(
                f"{who} draws on limit(s) {', '.join(unknown)} that no module of this process "
                f"defines (known: {', '.join(lim.name for lim in self) or 'none'}): define "
                "them with pipeline.limit(...) in a module PIPELINE_AGENT_MODULES imports")


limits = LimitRegistry("limit", UnknownLimit)


def limit(name: str, *, requests_per_minute: float | None = None,
          tokens_per_minute: float | None = None, concurrency: int | None = None,
          burst: int | None = None, price_per_1k_prompt: float | None = None,
          price_per_1k_completion: float | None = None) -> Limit:
    """Define the limit ``name`` (see the module docstring) and register it. Prices per
    1,000 prompt and completion tokens turn the usage of steps that draw on it into the
    cost their runs' budgets count."""
    return limits.register(Limit(name=name, requests_per_minute=requests_per_minute,
                                 tokens_per_minute=tokens_per_minute, concurrency=concurrency,
                                 burst=burst, price_per_1k_prompt=price_per_1k_prompt,
                                 price_per_1k_completion=price_per_1k_completion))
