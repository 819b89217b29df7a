"""The I/O shell: bind the planned sockets and serve them all from one ``selectors`` loop.

Never parses YAML or decides clashes: it is handed a survey and bindings. Signals reach the
loop as bytes on a wake-up socketpair (the handlers themselves do nothing), and are
dispatched from an explicit table.
"""

from __future__ import annotations

import contextlib
import random
import selectors
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from udpbindd.clash import Clash
from udpbindd.config import Config, Listener
from udpbindd.expand import Binding
from udpbindd.names import SocketName
from udpbindd.respond import RESPONDERS, Reply
from udpbindd.sockets import BindError, Options, open_udp
from udpbindd.stats import Stats
from udpbindd.survey import Survey
from udpbindd.systemd import Notifier, watchdog_interval

log = structlog.get_logger("udpbindd")

# Datagrams read from one socket per wake-up before the loop looks at the others.
DRAIN_BUDGET = 64
# Larger than any UDP payload (65,507 over IPv4, 65,527 over IPv6), so nothing is truncated.
BUFFER_SIZE = 65536


@dataclass(slots=True)
class Served:
    """A bound binding in the loop: its socket, counters and per-packet behaviour."""

    binding: Binding
    sock: socket.socket
    recv_buffer: int
    stats: Stats = field(default_factory=Stats)
    reply: Reply = field(init=False)
    drop_rate: float = field(init=False)

    def __post_init__(self) -> None:
        self.configure(self.binding)

    def configure(self, binding: Binding) -> None:
        """Take the per-packet settings (responder, drop rate) of ``binding``."""
        self.binding = binding
        self.reply = RESPONDERS[binding.listener.responder]
        self.drop_rate = binding.listener.drop_rate

    def drain(self, buffer: bytearray, view: memoryview, budget: int = DRAIN_BUDGET) -> int:
        """Read and answer up to ``budget`` datagrams; return how many were read."""
        sock, stats, reply, drop_rate = self.sock, self.stats, self.reply, self.drop_rate
        chance = random.random
        count = 0
        while count < budget:
            # Errors count against the budget too, so nothing can keep one socket in this loop.
            count += 1
            try:
                n, peer = sock.recvfrom_into(buffer)
            except (BlockingIOError, InterruptedError):
                count -= 1
                break
            except OSError:
                # A pending socket error (the asynchronous result of an earlier send) is
                # reported once by the next receive; it is no datagram.
                stats.send_errors += 1
                continue
            stats.received_packets += 1
            stats.received_bytes += n
            if drop_rate and chance() < drop_rate:  # noqa: S311 - simulated loss, not crypto
                stats.dropped_simulated += 1
                continue
            data = reply(view, n)
            if data is None:
                continue
            try:
                sent = sock.sendto(data, peer)
            except OSError:
                # ECONNREFUSED, ENOBUFS, EAGAIN, EPERM...: counted, never fatal.
                stats.send_errors += 1
                continue
            stats.sent_packets += 1
            stats.sent_bytes += sent
        return count


@dataclass(frozen=True, slots=True)
class Failure:
    """A listener's socket that could not be bound, and why, in words for an operator.

    ``socket`` is the socket name, or what the listener asked for when it stands for none.
    """

    listener: Listener
    socket: str
    reason: str
    errno_name: str = ""

    @property
    def required(self) -> bool:
        return self.listener.required

    def __str__(self) -> str:
        return f"listener {self.listener.name!r} ({self.socket}): {self.reason}"


class StartFailed(Exception):
    """Required listeners could not be bound; ``failures`` says which and why."""

    def __init__(self, failures: list[Failure]) -> None:
        self.failures = failures
        super().__init__("; ".join(str(failure) for failure in failures))


def options_of(binding: Binding) -> Options:
    listener = binding.listener
    return Options(listener.reuse_port, listener.freebind, listener.recv_buffer)


class Daemon:
    """Owns the selector, the wake-up socketpair and every serving socket."""

    def __init__(
        self,
        config: Config,
        *,
        notifier: Notifier | None = None,
        bind: Callable[[Binding], tuple[socket.socket, int]] | None = None,
    ) -> None:
        self.config = config
        self.notifier = notifier or Notifier({})
        self.served: dict[SocketName, Served] = {}
        self.failures: list[Failure] = []
        self._bind = bind or (lambda b: open_udp(b.name, options_of(b)))
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._running = False
        self._buffer = bytearray(BUFFER_SIZE)
        self._view = memoryview(self._buffer)
        self._handlers: dict[int, Callable[[], None]] = {
            signal.SIGTERM: self.stop,
            signal.SIGINT: self.stop,
            signal.SIGHUP: self.reload,
        }

    # -- setup ---------------------------------------------------------------------------------

    @property
    def wake_fd(self) -> int:
        """The fd for ``signal.set_wakeup_fd``: each signal number arrives as one byte."""
        return self._wake_w.fileno()

    def start(self, survey: Survey) -> None:
        """Bind every binding of ``survey`` that does not clash.

        Raises:
            StartFailed: a required listener could not be bound (nothing is left open).
        """
        clashes = {clash.binding: clash for clash in survey.clashes}
        failures = [
            Failure(
                item.listener, f"{item.listener.interface} port {item.listener.port}", item.reason
            )
            for item in survey.expansion.unresolved
        ]
        for binding in survey.expansion.bindings:
            clash = clashes.get(binding)
            if clash is not None:
                failures.append(_clash_failure(clash))
                continue
            failure = self.add(binding)
            if failure is not None:
                failures.append(failure)
        self.failures = failures
        for failure in failures:
            log.error(
                "bind_failed" if failure.errno_name else "listener_unavailable",
                listener=failure.listener.name,
                socket=failure.socket,
                required=failure.required,
                errno=failure.errno_name or None,
                error=failure.reason,
            )
        required = [failure for failure in failures if failure.required]
        if required:
            self.close()
            raise StartFailed(required)

    def add(self, binding: Binding) -> Failure | None:
        """Bind one binding and register it in the loop; a failure is returned, not raised."""
        try:
            sock, granted = self._bind(binding)
        except BindError as error:
            return Failure(binding.listener, str(binding.name), error.meaning, error.errno_name)
        served = Served(binding, sock, granted)
        self.served[binding.name] = served
        self._selector.register(sock, selectors.EVENT_READ, served)
        log.info(
            "listener_bound",
            listener=binding.listener.name,
            socket=str(binding.name),
            responder=binding.listener.responder.value,
            recv_buffer=granted,
        )
        return None

    def remove(self, name: SocketName) -> None:
        served = self.served.pop(name)
        self._selector.unregister(served.sock)
        served.sock.close()

    def status_text(self) -> str:
        failed = len(self.failures)
        return f"{len(self.served)} bound, 0 waiting, {failed} failed"

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stopped. Returns after every socket is closed."""
        self._running = True
        interval = watchdog_interval()
        self.notifier.ready(self.status_text())
        log.info("started", bound=len(self.served), failed=len(self.failures))
        select = self._selector.select
        buffer, view = self._buffer, self._view
        try:
            while self._running:
                for key, _ in select(interval):
                    served = key.data
                    if served is None:
                        self._wakeup()
                    else:
                        served.drain(buffer, view)
                if interval is not None:
                    # Pinged from the loop itself, so a stuck loop stops the pings.
                    self.notifier.watchdog()
        finally:
            self.notifier.stopping()
            self.close()
            log.info("stopped")

    def _wakeup(self) -> None:
        try:
            data = self._wake_r.recv(64)
        except BlockingIOError:
            return
        for signum in data:
            handler = self._handlers.get(signum)
            if handler is not None:
                handler()

    def wake(self, signum: int) -> None:
        """Deliver ``signum`` to the loop as the signal wake-up fd would (usable from threads)."""
        # A full pair means the loop has plenty of wake-ups queued already.
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(bytes([signum]))

    def stop(self) -> None:
        log.info("stopping")
        self._running = False

    def reload(self) -> None:
        log.warning("reload_unsupported", detail="restart udpbindd to apply a changed file")

    def close(self) -> None:
        for name in list(self.served):
            self.remove(name)

    def shutdown(self) -> None:
        """Release the selector and the wake-up pair (after ``run`` or a failed ``start``)."""
        self.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


def _clash_failure(clash: Clash) -> Failure:
    binding = clash.binding
    assumed = "" if clash.certain else " (assumed: see udpbindd check)"
    reason = f"address already in use: clashes with {clash.other_label}: {clash.why}{assumed}"
    return Failure(binding.listener, str(binding.name), reason, "EADDRINUSE")
