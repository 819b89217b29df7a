"""File descriptors: each listener socket is one, so thousands of listeners need a high limit.

Owns raising the soft ``RLIMIT_NOFILE`` to the hard limit at start (the soft limit is the one
the kernel enforces; systemd and most shells leave it at 1,024 for the sake of programs that
still use ``select()``, which udpbindd does not) and the refusal, before anything is bound,
of a configuration that cannot fit under the hard limit.
"""

from __future__ import annotations

import resource

# Descriptors besides the listener sockets: standard streams, the selector, the wake-up
# pair, the netlink watch and survey sockets, the metrics server and its clients, the
# batched path's mapping, /proc reads, with room to spare.
RESERVE = 64


def raise_soft_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit; return (soft, hard) after.

    Never lowers anything, and keeps the limits as they are if the kernel refuses.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if resource.RLIM_INFINITY in (soft, hard) or soft >= hard:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):
        return soft, hard
    return hard, hard


def shortage(sockets: int, soft: int) -> str:
    """Why ``sockets`` listener sockets cannot all be open under ``soft``; "" if they can."""
    if soft == resource.RLIM_INFINITY or sockets + RESERVE <= soft:
        return ""
    return (
        f"{sockets} listener sockets need about {sockets + RESERVE} file descriptors, but "
        f"this process may open only {soft} (RLIMIT_NOFILE, hard limit): raise it, e.g. "
        f"LimitNOFILE={_round_up(sockets + RESERVE)} in the unit or ulimit -Hn"
    )


def _round_up(value: int) -> int:
    """``value`` rounded up to a power of two, as such limits are usually written."""
    return 1 << (value - 1).bit_length()
