"""sd_notify adapter: READY, STATUS, RELOADING, STOPPING, WATCHDOG and EXTEND_TIMEOUT_USEC.

The only module that imports the untyped ``sdnotify``. Without NOTIFY_SOCKET every call is a
no-op. It makes no decisions (the daemon says when); it owns the wire details sdnotify leaves
to its caller: one field per line, UTF-8, a bounded send, errors reported instead of
swallowed, and the socket closed. ``watchdog_interval`` reads WATCHDOG_USEC and WATCHDOG_PID.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from collections.abc import Mapping

import sdnotify
import structlog

log = structlog.get_logger("udpbindd")

# A manager that stops reading its socket must not stall the serving loop for long; a send
# that waits longer than this is reported and dropped.
SEND_TIMEOUT = 1.0
# A line break inside a value would start a field of its own (a STATUS= text could forge
# READY=1); other control characters have no business in a status line either.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Notifier:
    """Sends sd_notify messages to the service manager, if there is one.

    ``environ`` decides whether there is one (tests pass ``{}`` for none); the address is
    the process's NOTIFY_SOCKET, because that is where sdnotify reads it.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.enabled = False
        self._notifier: sdnotify.SystemdNotifier | None = None
        if not address:
            return
        if address != os.environ.get("NOTIFY_SOCKET"):
            raise ValueError("NOTIFY_SOCKET must be the process's own: sdnotify reads it there")
        with warnings.catch_warnings():
            # When connect() fails, sdnotify drops its new socket without closing it.
            warnings.simplefilter("ignore", ResourceWarning)
            try:
                notifier = sdnotify.SystemdNotifier(debug=True)
            except OSError as error:
                log.warning("notify_socket_unusable", notify_socket=address, error=str(error))
                return
        notifier.socket.settimeout(SEND_TIMEOUT)
        self._notifier = notifier
        self.enabled = True

    def close(self) -> None:
        """Close the notification socket (sdnotify never does)."""
        if self._notifier is not None:
            self._notifier.socket.close()
            self._notifier = None

    def send(self, *fields: str) -> None:
        """Send ``fields`` (``KEY=value`` each) as one message; failures are logged, not raised."""
        if self._notifier is None:
            return
        message = "\n".join(_CONTROL.sub(" ", item) for item in fields)
        # sdnotify encodes with Latin-1, which fails on most text (and then sends nothing);
        # systemd reads UTF-8. Spelling the UTF-8 bytes as Latin-1 sends exactly those bytes.
        wire = message.encode("utf-8", "backslashreplace").decode("latin-1")
        try:
            self._notifier.notify(wire)
        except OSError as error:
            log.warning(
                "notify_failed", fields=[f.partition("=")[0] for f in fields], error=str(error)
            )

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd tell this reload's READY=1 from an earlier one.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def extend_timeout(self, usec: int, status: str) -> None:
        """Ask for ``usec`` more microseconds of start-up (systemd 236+), with a STATUS=.

        Systemd then waits that long for the next message, even past TimeoutStartSec=, so a
        start-up that keeps sending these may wait longer than the unit's timeout, and one
        whose loop stops sending them still times out.
        """
        self.send(f"EXTEND_TIMEOUT_USEC={usec}", f"STATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not asked for.

    As ``sd_watchdog_enabled``: WATCHDOG_PID, when set, must be this process's pid, so a
    child that inherited the variables does not ping on the daemon's behalf.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2 / 1_000_000
