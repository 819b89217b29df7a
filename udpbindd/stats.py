"""Per-binding traffic counters: plain ints bumped by the loop, read by the metrics collector.

No locks: one thread writes, scrapes read; a racy read of an int is at worst one packet old.
"""

from __future__ import annotations

from dataclasses import dataclass

from udpbindd.guard import Verdict

DROP_REASONS = ("simulated", "send_error", "denied", "rate_limited", "reflection")


@dataclass(slots=True)
class Stats:
    """Counters for one binding. ``kernel`` drops are read from the socket, not counted here."""

    received_packets: int = 0
    received_bytes: int = 0
    sent_packets: int = 0
    sent_bytes: int = 0
    dropped_simulated: int = 0
    send_errors: int = 0
    dropped_denied: int = 0
    dropped_rate_limited: int = 0
    dropped_reflection: int = 0
    # Sources the rate limiter forgot to make room for new ones (not datagrams dropped).
    rate_limit_evictions: int = 0
    # Kernel drops of this socket name's earlier sockets (closed by a re-bind or a rollback),
    # so the exported kernel count never goes back when the name moves to a new socket.
    kernel_drops_closed: int = 0

    def refused(self, verdict: Verdict) -> None:
        """Count one datagram the guard refused, under its reason."""
        if verdict is Verdict.DENIED:
            self.dropped_denied += 1
        elif verdict is Verdict.RATE_LIMITED:
            self.dropped_rate_limited += 1
        else:
            self.dropped_reflection += 1

    def dropped(self) -> dict[str, int]:
        """Drops by reason, as the ``reason`` label of udpbindd_dropped_packets_total."""
        return {
            "simulated": self.dropped_simulated,
            "send_error": self.send_errors,
            "denied": self.dropped_denied,
            "rate_limited": self.dropped_rate_limited,
            "reflection": self.dropped_reflection,
        }
