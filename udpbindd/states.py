"""Listener states: bound, waiting or failed; when failed ones are retried; when start-up ends.

Pure: the daemon hands in what it serves, what waits and what failed, with the time; these
functions say what changed (for the logs), when to try again, what STATUS= reads, and whether
start-up may send READY=1, must keep systemd waiting (EXTEND_TIMEOUT_USEC) or has timed out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

BOUND = "bound"
WAITING = "waiting"  # the address or interface is absent; bound the moment it appears
FAILED = "failed"  # a real error (a clash, EACCES...); tried again with backoff
STATES = (BOUND, WAITING, FAILED)

# A failed socket is tried again after 1 s, then 2, 4... up to a minute: quick to recover
# from a port released a moment later, cheap when the clash is there to stay.
RETRY_FIRST = 1.0
RETRY_MAX = 60.0

# While start-up waits, systemd is asked for this much more time each time, at this
# interval: a loop that stops making progress still times out, well before any bind_timeout.
EXTEND_INTERVAL = 5.0
EXTEND_MARGIN = 5.0

Key = tuple[str, str]  # (listener name, socket label): one series of udpbindd_listener_state


@dataclass(frozen=True, slots=True)
class Entry:
    """The state of one listener socket, and why when it is not bound."""

    state: str
    reason: str = ""
    required: bool = True


def status_text(bound: int, waiting: int, failed: int) -> str:
    """What STATUS= says: ``3 bound, 1 waiting, 0 failed``."""
    return f"{bound} bound, {waiting} waiting, {failed} failed"


def changes(before: Mapping[Key, Entry], after: Mapping[Key, Entry]) -> list[tuple[Key, Entry]]:
    """The entries of ``after`` that are new or differ from ``before``, in ``after``'s order.

    A state the logs already told (the same state for the same reason) is not told again.
    """
    return [(key, entry) for key, entry in after.items() if before.get(key) != entry]


def retry_delay(attempts: int, first: float = RETRY_FIRST, cap: float = RETRY_MAX) -> float:
    """Seconds before the next try after ``attempts`` failed ones (1 → ``first``)."""
    if attempts <= 1:
        return min(first, cap)
    # Beyond 2**64 the cap has long been reached; the exponent is bounded to stay a float.
    return min(first * 2.0 ** min(attempts - 1, 64), cap)


class Backoff:
    """When each failed socket is tried next: ``first`` seconds after it failed, doubling.

    A socket is tried whenever the daemon re-applies its listeners, which address events also
    cause; only a try made when the retry was due counts towards the delay, so a busy host
    does not push every retry out to the cap.
    """

    def __init__(self, first: float = RETRY_FIRST, cap: float = RETRY_MAX) -> None:
        self.first = first
        self.cap = cap
        self._attempts: dict[Key, int] = {}
        self._due: dict[Key, float] = {}

    def update(self, failed: Iterable[Key], now: float) -> None:
        """Record the outcome of a try at ``now``: ``failed`` are still failed, others are not."""
        still = set(failed)
        for key in list(self._attempts):
            if key not in still:
                del self._attempts[key], self._due[key]
        for key in still:
            attempts = self._attempts.get(key)
            if attempts is None:
                attempts = 1
            elif now >= self._due[key]:
                attempts += 1
            else:
                continue  # an early try: the schedule stands
            self._attempts[key] = attempts
            self._due[key] = now + retry_delay(attempts, self.first, self.cap)

    def due(self) -> float | None:
        """The time of the earliest retry, or None when nothing has failed."""
        return min(self._due.values(), default=None)

    def delay(self, key: Key, now: float) -> float | None:
        """Seconds until ``key`` is tried again, or None when it is not failed."""
        due = self._due.get(key)
        return None if due is None else max(0.0, due - now)


@dataclass(frozen=True, slots=True)
class Holding:
    """A required listener's socket that is not bound yet, holding start-up back."""

    listener: str
    socket: str
    reason: str
    bind_timeout: float


@dataclass(frozen=True, slots=True)
class Gate:
    """Where start-up stands: ``ready``, still waiting until ``deadline``, or ``expired``."""

    ready: bool
    deadline: float | None = None
    expired: tuple[Holding, ...] = ()


def gate(holding: Iterable[Holding], started: float, now: float) -> Gate:
    """Whether start-up may end, given what still holds it back since ``started``.

    Each holding socket may wait its own listener's ``bind_timeout``; once any of them has
    waited that long, start-up fails, naming every socket whose time is up.
    """
    items = list(holding)
    if not items:
        return Gate(ready=True)
    expired = tuple(item for item in items if now >= started + item.bind_timeout)
    deadline = started + min(item.bind_timeout for item in items)
    return Gate(ready=False, deadline=deadline, expired=expired)


def extend_usec(now: float, deadline: float, interval: float = EXTEND_INTERVAL) -> int:
    """EXTEND_TIMEOUT_USEC= for a message sent at ``now``, the next one due ``interval`` later.

    Enough for the next message plus a margin; near the deadline, enough to reach it plus
    the margin, so udpbindd reports its own timeout before systemd's runs out.
    """
    seconds = min(max(deadline - now, 0.0), 2 * interval) + EXTEND_MARGIN
    return math.ceil(seconds * 1_000_000)
