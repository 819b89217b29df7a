"""Per-binding traffic counters: plain ints bumped by the loop, read by the metrics collector.

No locks: one thread writes, scrapes read; a racy read of an int is at worst one packet old.
"""

from __future__ import annotations

from dataclasses import dataclass

DROP_REASONS = ("simulated", "send_error")


@dataclass(slots=True)
class Stats:
    """Counters for one binding. ``kernel`` drops are read from the socket, not counted here."""

    received_packets: int = 0
    received_bytes: int = 0
    sent_packets: int = 0
    sent_bytes: int = 0
    dropped_simulated: int = 0
    send_errors: int = 0

    def dropped(self) -> dict[str, int]:
        """Drops by reason, as the ``reason`` label of udpbindd_dropped_packets_total."""
        return {"simulated": self.dropped_simulated, "send_error": self.send_errors}
