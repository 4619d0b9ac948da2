"""Choreography: agents that react to events instead of being called.

``Choreography("research_report", start="research.requested",
terminal=["report.completed"], input="research_question@1")`` declares a flow;
the agents declare what they react to (``on=["research.*"]``) and what they
publish (``emits="research.completed"``). Adding an agent is subscribing it:
nothing else changes.

A run's events and deliveries are recorded in Redis, so every flow can be
explained after the fact. Publishing records the event (id, type, cause,
version) and one ``dispatched`` delivery per subscriber, then sends one Celery
task per subscriber on its queue. Delivery is at least once; handling is once
per (event, subscriber): the delivery is the step key ``<event>:<agent>``, the
first task to open it claims it, and any other task delivering it is recorded
``duplicate`` and does nothing. A delivery ends in the same round trip that
seals its output (``emit.lua``, queued behind ``seal.lua``), which also
publishes what the agent emits; the run succeeds when a terminal event has
been published and no delivery is outstanding. A handler that fails for good
publishes ``<agent>.failed`` and the saga compensates, newest first, what was
sealed.
"""

from .delivery import Delivery
from .flow import Choreography
from .publishing import (
    CLIENT,
    EMIT,
    START,
    Handover,
    dispatch,
    enqueue,
    event_record,
    fail_delivery,
    follow_up,
    owed,
    publish,
    redeliver,
    redrive,
)

__all__ = ["CLIENT", "EMIT", "START", "Choreography", "Delivery", "Handover", "dispatch",
           "enqueue", "event_record", "fail_delivery", "follow_up", "owed", "publish",
           "redeliver", "redrive"]
