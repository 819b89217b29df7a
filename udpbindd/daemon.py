"""The I/O shell: bind the planned sockets and serve them all from one ``selectors`` loop.

Never parses YAML or decides clashes: it is handed a survey and bindings. Owns the start and
reload transaction (``apply``: bind, close, relabel, roll back), the state a scrape reads
(published as one ``Snapshot`` reference), and the sd_notify sequence around a reload. Signals
reach the loop as bytes on a wake-up socketpair (the handlers themselves do nothing), and are
dispatched from an explicit table. Interface changes reach it on a netlink socket in the same
loop (``watch.py``); each re-applies the configuration (``refresh``), so every socket is
bound, waiting for its address or interface, or failed and retried with backoff.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import ipaddress
import os
import random
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field

import structlog

from udpbindd import batch, states
from udpbindd.activation import Inherited, assign
from udpbindd.clash import Clash
from udpbindd.config import Config, ConfigError, IOMode, Listener
from udpbindd.expand import Absent, Binding
from udpbindd.gcpause import collection_paused
from udpbindd.guard import Guard, build_guard
from udpbindd.metrics import Down, Snapshot
from udpbindd.names import IPAddress, SocketName
from udpbindd.plan import Plan, close_order, diff
from udpbindd.poller import ReadSelector
from udpbindd.respond import RESPONDERS, Reply
from udpbindd.sockets import (
    ICMP_ERRNOS,
    PKTINFO_SPACE,
    Address,
    BindError,
    Options,
    enable_error_queue,
    enable_pktinfo,
    kernel_drops,
    open_udp,
    read_error_queue,
    reply_source,
    set_receive_buffer,
)
from udpbindd.stats import Stats
from udpbindd.survey import Survey
from udpbindd.survey import survey as survey_host
from udpbindd.systemd import Notifier, watchdog_interval
from udpbindd.watch import InterfaceWatch

log = structlog.get_logger("udpbindd")
_now = time.monotonic_ns

# Datagrams read from one socket per wake-up before the loop looks at the others.
DRAIN_BUDGET = 64
# With at least this many sockets ready at once, load is spread thin: each holds about one
# datagram, so each gets one plain receive and reply per pass (no receive that finds the
# queue empty, no batch set up for one datagram); the level-triggered selector brings back
# any socket that holds more.
SPREAD = 16
# Larger than any UDP payload (65,507 over IPv4, 65,527 over IPv6), so nothing is truncated.
BUFFER_SIZE = 65536
# bind() errors that mean the address or device is absent: the socket waits, it has not failed.
ABSENT_ERRNOS = frozenset({"EADDRNOTAVAIL", "ENODEV"})


class _Own(enum.Enum):
    """The selector's data for the daemon's own files (listener sockets carry their Served)."""

    WAKE = "wake"  # the wake-up socketpair: signals
    WATCH = "watch"  # the interface watch: netlink


@dataclass(slots=True)
class Served:
    """A bound binding in the loop: its socket, counters and per-packet behaviour.

    ``previous`` is the guard this socket had before a relabel: its rate-limit buckets are
    kept when the limit did not change. ``broadcast`` is the host's IPv4 subnet broadcast
    addresses, which the guard refuses as sources; the daemon hands in the current set and
    ``set_broadcast`` follows it when an interface changes.
    """

    binding: Binding
    sock: socket.socket
    recv_buffer: int
    stats: Stats = field(default_factory=Stats)
    previous: InitVar[Guard | None] = None
    broadcast: frozenset[ipaddress.IPv4Address] = frozenset()
    reply: Reply = field(init=False)
    drop_rate: float = field(init=False)
    # The listener's source policy; None when it has nothing to check (one test per datagram).
    guard: Guard | None = field(init=False, default=None)
    # Answer from each request's destination address (a wildcard socket, see enable_pktinfo).
    pktinfo: bool = field(init=False, default=False)
    inode: int = field(init=False)  # identifies the socket in /proc and sock_diag
    # The last wake-up found at most one datagram: take the next one the plain way, at once.
    quiet: bool = field(init=False, default=True)

    def __post_init__(self, previous: Guard | None) -> None:
        self.guard = previous
        self.configure(self.binding)
        self.inode = os.fstat(self.sock.fileno()).st_ino
        if self.binding.name.is_wildcard:
            enable_pktinfo(self.sock)
            self.pktinfo = True

    def kernel_drops(self) -> int | None:
        """Datagrams the kernel discarded for this socket name (its receive queue was full).

        None when the socket was closed under the caller (a scrape racing a reload).
        """
        drops = kernel_drops(self.sock)
        return None if drops is None else drops + self.stats.kernel_drops_closed

    def close(self) -> None:
        """Close the socket, keeping its kernel drop count with the counters that outlive it."""
        self.stats.kernel_drops_closed += kernel_drops(self.sock) or 0
        self.sock.close()

    def _queued_errors(self) -> int:
        """Send errors behind a failed receive: the ICMP errors queued, and at least one."""
        return max(1, read_error_queue(self.sock, DRAIN_BUDGET))

    def _send_failed(
        self,
        error: OSError,
        data: bytes | memoryview,
        peer: Address,
        source: list[tuple[int, int, bytes]] | None,
    ) -> int:
        """Count a failed reply; return the bytes a second try sent, or -1.

        A send can fail with an ICMP error about an earlier reply that was waiting on the
        socket: then that error is what gets counted (from the error queue, which also empties
        it), and this reply, which was never tried, is sent once more.
        """
        stats = self.stats
        icmp = read_error_queue(self.sock, DRAIN_BUDGET) if error.errno in ICMP_ERRNOS else 0
        stats.send_errors += icmp
        if icmp:
            try:
                if source is None:
                    return self.sock.sendto(data, peer)
                return self.sock.sendmsg([data], source, 0, peer)
            except OSError:
                pass
        stats.send_errors += 1
        return -1

    def configure(self, binding: Binding) -> None:
        """Take the per-packet settings (responder, drop rate, source policy) of ``binding``."""
        self.binding = binding
        self.reply = RESPONDERS[binding.listener.responder]
        self.drop_rate = binding.listener.drop_rate
        self.guard = build_guard(binding.listener, self.broadcast, previous=self.guard)

    def set_broadcast(self, broadcast: frozenset[ipaddress.IPv4Address]) -> None:
        """Refuse ``broadcast`` (the host's subnet broadcasts now) as sources from now on.

        Only the guard is built again, keeping its rate-limit buckets, and only when the set
        changed. The loop calls this between drains, never during one: the per-packet path
        reads the guard once per wake-up and stays as it is.
        """
        if broadcast == self.broadcast:
            return
        self.broadcast = broadcast
        self.guard = build_guard(self.binding.listener, broadcast, previous=self.guard)

    def drain(  # noqa: PLR0915 - the per-datagram loop is kept whole: no call per datagram
        self, buffer: bytearray, view: memoryview, budget: int = DRAIN_BUDGET
    ) -> int:
        """Read and answer up to ``budget`` datagrams; return how many receives were made.

        Bounded so that one flooded socket cannot starve the others: the selector is
        level-triggered, so the loop comes back for the rest on its next pass. Every datagram
        received is answered or counted under exactly one drop reason, in this order: the
        guard's verdict (denied, reflection, rate_limited), the simulated loss, the guard's
        reply-size check (reflection), a failed send (send_error).
        """
        # What each datagram needs, in locals: read inline, since a quiet socket's lone
        # datagram pays this set-up on its way to the reply.
        sock, stats, reply, drop_rate, guard = (
            self.sock,
            self.stats,
            self.reply,
            self.drop_rate,
            self.guard,
        )
        # A wildcard socket answers from each request's destination: recvmsg/sendmsg with the
        # packet info, which cost more than recvfrom/sendto, so only it takes them.
        pktinfo, buffers = self.pktinfo, [view]
        source: list[tuple[int, int, bytes]] | None = None
        chance = random.random  # simulated loss needs no cryptographic randomness
        # One clock read per wake-up: the rate limit needs no finer time than that.
        now, checks_replies = (0, False) if guard is None else (_now(), guard.checks_replies)
        count = 0
        while count < budget:
            try:
                if pktinfo:
                    n, ancillary, _, peer = sock.recvmsg_into(buffers, PKTINFO_SPACE)
                else:
                    n, peer = sock.recvfrom_into(buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # A pending socket error (an ICMP error about an earlier reply) is reported
                # once by the next receive. It counts against the budget too, so nothing
                # can hold the loop on one socket.
                count += 1
                stats.send_errors += self._queued_errors()
                continue
            count += 1
            stats.received_packets += 1
            stats.received_bytes += n
            # The policy-free path pays this one test; the guarded one repeats the next few
            # lines so that the reply-size check costs the other path nothing.
            if guard is not None:
                verdict = guard.check(peer[0], peer[1], now)
                if verdict is not None:
                    stats.refused(verdict)
                    continue
                if drop_rate and chance() < drop_rate:
                    stats.dropped_simulated += 1
                    continue
                data = reply(view, n)
                if data is None:
                    continue
                if checks_replies and not guard.reply_ok(peer[0], n, len(data)):
                    stats.dropped_reflection += 1
                    continue
            else:
                if drop_rate and chance() < drop_rate:
                    stats.dropped_simulated += 1
                    continue
                data = reply(view, n)
                if data is None:
                    continue
            try:
                if pktinfo:
                    source = reply_source(ancillary)
                    sent = sock.sendmsg([data], source, 0, peer)
                else:
                    sent = sock.sendto(data, peer)
            except OSError as error:
                # ECONNREFUSED, ENOBUFS, EAGAIN, EPERM...: counted, never fatal.
                sent = self._send_failed(error, data, peer, source)
                if sent < 0:
                    continue
            stats.sent_packets += 1
            stats.sent_bytes += sent
        if guard is not None and guard.limiter is not None:
            stats.rate_limit_evictions += guard.take_evictions()
        return count

    def drain_batched(self, fast: batch.Batch, buffer: bytearray, view: memoryview) -> int:
        """``drain`` through ``fast`` (recvmmsg/sendmmsg); return how many receives were made.

        A socket whose last wake-up found one datagram or none is likely answering one client
        at a time: its first two datagrams are taken and answered the plain way (one recvfrom
        and one sendto cost less than setting up a batch), so a lone request waits for no
        batch, and the receive that finds the queue empty is a plain one too, which costs
        half what an empty batch does. Only when a second datagram was there is the rest read
        in batches. Under load it goes straight to batches. Replies and counters are those
        of ``drain``.
        """
        first = 0
        if self.quiet:
            first = self.drain(buffer, view, 2)
            if first < 2:
                return first
        count = first + fast.drain(
            self.sock,
            self.reply,
            self.stats,
            self.drop_rate,
            DRAIN_BUDGET - first,
            guard=self.guard,
            pktinfo=self.pktinfo,
        )
        self.quiet = count <= 1
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


@dataclass(frozen=True, slots=True)
class Waiting:
    """A listener's socket whose address or interface is absent now; bound when it appears.

    ``socket`` is the socket name, or what the listener asked for when it stands for none
    (an interface that does not exist, or has no address of the listener's family).
    """

    listener: Listener
    socket: str
    reason: str

    @property
    def required(self) -> bool:
        return self.listener.required

    def __str__(self) -> str:
        return f"listener {self.listener.name!r} ({self.socket}): {self.reason}"


def options_of(binding: Binding) -> Options:
    listener = binding.listener
    return Options(listener.reuse_port, listener.freebind, listener.recv_buffer)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one ``apply`` did: the plan, every failure, and whether it was undone."""

    plan: Plan
    failures: tuple[Failure, ...]
    rolled_back: bool
    # Previous sockets that a rollback could not bind again (another process took the name).
    lost: tuple[Failure, ...] = ()
    waiting: tuple[Waiting, ...] = ()

    @property
    def required_failures(self) -> list[Failure]:
        return [failure for failure in self.failures if failure.required]


Binder = Callable[[Binding], tuple[socket.socket, int]]
Surveyor = Callable[..., Survey]


class Daemon:
    """Owns the selector, the wake-up socketpair and every serving socket.

    Startup and reload are the same transaction (``apply``): from the empty set at start,
    from the serving set on SIGHUP, and from the serving set to the same configuration
    against new interfaces when an address or interface comes or goes (``refresh``).
    ``watch=False`` follows no interface changes (addresses are then read per survey).
    """

    def __init__(
        self,
        config: Config,
        *,
        notifier: Notifier | None = None,
        bind: Binder | None = None,
        loader: Callable[[], Config] | None = None,
        inherited: list[Inherited] | None = None,
        surveyor: Surveyor = survey_host,
        watch: bool = True,
    ) -> None:
        self.config = config
        self.notifier = notifier or Notifier({})
        self.served: dict[SocketName, Served] = {}
        self.failures: list[Failure] = []
        self.waiting: list[Waiting] = []
        self.reload_ok = True
        self.reload_timestamp = 0.0
        self._bind = bind or (lambda b: open_udp(b.name, options_of(b)))
        self._loader = loader
        self._inherited = list(inherited or [])
        self._activated = inherited is not None and bool(inherited)
        self._adopted: dict[Binding, Inherited] = {}
        # Each granted receive buffer size once: 10,000 sockets granted the same size share
        # one int rather than holding 10,000 equal ones.
        self._granted: dict[int, int] = {}
        self._survey = surveyor
        self._snapshot = Snapshot()
        self._selector = ReadSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _Own.WAKE)
        self._running = False
        self._buffer = bytearray(BUFFER_SIZE)
        self._view = memoryview(self._buffer)
        self._batch: batch.Batch | None = None
        self._batch_refused = False  # said once that recvmmsg/sendmmsg cannot be used
        self._choose_io(config.io)
        self._handlers: dict[int, Callable[[], None]] = {
            signal.SIGTERM: self.stop,
            signal.SIGINT: self.stop,
            signal.SIGHUP: self.reload,
        }
        # Following the interfaces: the watch, and whether its table changed this loop pass.
        self._watching = watch
        self._watch: InterfaceWatch | None = None
        self._dirty = False
        self._watch_retry: float | None = None  # when to read the table again after an error
        self._device_index: dict[SocketName, int] = {}  # the interface each device socket holds
        # The host's subnet broadcasts (from the watch), handed to every served socket's guard.
        self._broadcast: frozenset[ipaddress.IPv4Address] = frozenset()
        self._inherited_names: set[SocketName] = set()
        # States as the logs last told them, and when failed sockets are tried again.
        self._entries: dict[states.Key, states.Entry] = {}
        self._backoff = states.Backoff()
        # Start-up: READY=1 waits until every required listener is bound (or its time is up).
        self._started = 0.0
        self._ready = False
        self._next_extend = 0.0
        self._deadline: float | None = None  # when the first required listener's time is up
        self._status = ""
        self._timer: float | None = None  # the next retry, extension or deadline

    # -- state ---------------------------------------------------------------------------------

    @property
    def wake_fd(self) -> int:
        """The fd for ``signal.set_wakeup_fd``: each signal number arrives as one byte."""
        return self._wake_w.fileno()

    @property
    def io(self) -> IOMode:
        """How the loop moves datagrams now (batched only where the platform allows)."""
        return IOMode.PLAIN if self._batch is None else IOMode.BATCHED

    def _choose_io(self, mode: IOMode) -> None:
        """Move datagrams as ``mode`` asks: batched where recvmmsg/sendmmsg work, else plain."""
        if mode is IOMode.PLAIN:
            self._batch = None
            return
        if self._batch is not None:
            return
        if batch.available():
            self._batch = batch.Batch()
        elif not self._batch_refused:
            self._batch_refused = True
            log.warning(
                "batched_io_unavailable",
                detail="recvmmsg/sendmmsg cannot be used here; one recvfrom/sendto per datagram",
            )

    def own_inodes(self) -> set[int]:
        """Inodes of the sockets udpbindd holds (serving or inherited): never foreign."""
        inodes = {served.inode for served in self.served.values()}
        inodes.update(os.fstat(item.sock.fileno()).st_ino for item in self._inherited)
        return inodes

    def snapshot(self) -> Snapshot:
        """What a scrape reports; safe to call from the metrics thread (reads one reference)."""
        return self._snapshot

    def status_text(self) -> str:
        return states.status_text(len(self.served), len(self.waiting), len(self.failures))

    @property
    def ready(self) -> bool:
        """Whether READY=1 was sent: every required listener was bound (start-up is over)."""
        return self._ready

    def unbound(self) -> dict[states.Key, states.Entry]:
        """Every socket that waits or failed, keyed by (listener name, socket label).

        Bound ones are left out: with thousands of listeners this runs on every change, and
        a socket missing here is bound (or no longer configured).
        """
        found: dict[states.Key, states.Entry] = {}
        for item in self.waiting:
            entry = states.Entry(states.WAITING, item.reason, item.required)
            found.setdefault((item.listener.name, item.socket), entry)
        for failure in self.failures:
            entry = states.Entry(states.FAILED, failure.reason, failure.required)
            found.setdefault((failure.listener.name, failure.socket), entry)
        return found

    def _publish(self) -> None:
        # One reference swap, once the served set, its failures and the reload gauges all say
        # the same: a scrape sees the state before a change or after it, never a mixture.
        # Served objects are never changed once published (a relabel makes a new one), so the
        # snapshot cannot move under a scrape either; only the plain counters keep counting
        # (and the guard, which no scrape reads, follows the host's subnet broadcasts).
        self._snapshot = Snapshot(
            bound=tuple(self.served.values()),
            down=(
                *(Down(f.listener.name, f.socket, states.FAILED) for f in self.failures),
                *(Down(w.listener.name, w.socket, states.WAITING) for w in self.waiting),
            ),
            reload_ok=self.reload_ok,
            reload_timestamp=self.reload_timestamp,
        )

    # -- start and reload ----------------------------------------------------------------------

    def start(self, survey: Survey) -> None:
        """Bind every binding of ``survey`` that does not clash (a reload from the empty set).

        Nothing is bound when the survey already shows that a required listener cannot be
        served. Failures of listeners with ``required: false`` are logged and the rest are
        served; required failures are left to the caller, which reports them. A socket whose
        address or interface is absent waits; ``run`` holds READY=1 back for required ones.

        Raises:
            StartFailed: a required listener could not be bound (nothing is left open).
        """
        if self._watch is None and self._watching:
            # Subscribed only now: the survey may have read interfaces that have changed since.
            addresses = self.watch()
            self._dirty = addresses is not None and survey.interfaces != addresses
        self._started = time.monotonic()
        self._assign_inherited(survey)
        outcome = self.apply(survey)
        self._log_failures(outcome, only_optional=True)
        self._adopt_leftovers()
        if outcome.rolled_back:
            self.close()
            raise StartFailed(outcome.required_failures)
        self.failures = list(outcome.failures)
        self.waiting = list(outcome.waiting)
        self.reload_ok, self.reload_timestamp = True, time.time()
        self._settle(log_failures=False)

    def watch(self) -> dict[str, tuple[IPAddress, ...]] | None:
        """Subscribe to interface changes and read the interface table; return its addresses.

        Call it before the start-up survey and survey these addresses: no change can then
        fall between the survey and the subscription. None when following interfaces is off,
        or netlink is unavailable (each survey then reads the addresses itself, and a socket
        waiting for one is bound on the next reload only).
        """
        if self._watch is None and self._watching:
            try:
                self._watch = InterfaceWatch()
            except OSError as error:
                self._watching = False
                log.warning(
                    "interface_watch_unavailable",
                    error=str(error),
                    detail="addresses that appear later are bound on reload only",
                )
                return None
            self._selector.register(self._watch.sock, selectors.EVENT_READ, _Own.WATCH)
            self._follow_broadcasts()
        return self._addresses()

    def _addresses(self) -> dict[str, tuple[IPAddress, ...]] | None:
        return None if self._watch is None else self._watch.addresses()

    def apply(self, survey: Survey, *, strict: bool = True) -> Outcome:
        """Move from the serving set to the one ``survey`` describes, as one transaction.

        Kept sockets are untouched. A new socket whose name overlaps an old one being closed
        is bound right after closing it; other old sockets close once the new set is bound.
        If a required binding fails, the previous set is restored (what was closed is bound
        again, what was opened is closed) and nothing else changes: relabels and the counters
        of re-bound sockets only take effect once every binding has succeeded. A listener
        with ``required: false`` that fails is reported in the outcome, not rolled back.
        Without ``strict`` (an interface change, not a new configuration) no failure is
        rolled back, required or not: each failed socket is reported and the rest proceed.

        A socket whose address or interface is absent is not a failure: it waits (and a
        serving one whose address went away is closed). So does one whose bind() finds the
        address or device gone since the survey (EADDRNOTAVAIL, ENODEV).

        The caller publishes the result (``_publish``) with its failures and reload state.
        """
        waiting = [
            Waiting(u.listener, f"{u.listener.interface} port {u.listener.port}", u.reason)
            for u in survey.expansion.unresolved
        ]
        failures = [_clash_failure(clash) for clash in survey.clashes]
        absent = self._absent(survey)
        waiting += [Waiting(a.binding.listener, str(a.binding.name), a.reason) for a in absent]
        wanted = _excluding(_without_clashes(survey), [a.binding for a in absent])
        plan = diff({name: s.binding for name, s in self.served.items()}, wanted)
        if strict and any(failure.required for failure in failures):
            # Refuse before touching anything: a change bound to fail must not take ports
            # from other processes, or close serving sockets, even for a moment.
            return Outcome(plan, tuple(failures), rolled_back=True, waiting=tuple(waiting))
        order = list(self.served)
        closes = [self.served[name].binding for name in plan.closes]
        closed: dict[SocketName, Served] = {}
        opened: dict[SocketName, Served] = {}
        for binding, first in close_order(plan.opens, closes, os.geteuid()):
            for name in first:
                closed[name] = self._retire(name)
            served, failure = self._open(binding)
            if failure is not None and failure.errno_name in ABSENT_ERRNOS:
                waiting.append(Waiting(binding.listener, failure.socket, failure.reason))
            elif failure is not None:
                failures.append(failure)
                if failure.required and strict:
                    lost = self._rollback(opened, closed, order)
                    return Outcome(
                        plan, tuple(failures), rolled_back=True, lost=lost, waiting=tuple(waiting)
                    )
            elif served is not None:
                opened[binding.name] = served
        # Commit. Nothing below can fail, so nothing below needs undoing.
        for name in plan.closes:
            if name not in closed:
                closed[name] = self._retire(name)
        for binding in plan.relabel:
            self.served[binding.name] = self._relabel(self.served[binding.name], binding)
        for name, served in opened.items():
            old = closed.get(name)
            if old is not None:
                served.stats = old.stats  # a re-bound socket name keeps counting on
            self.served[name] = served
        for name in plan.remove:
            log.info(
                "listener_closed", listener=closed[name].binding.listener.name, socket=str(name)
            )
        return Outcome(plan, tuple(failures), rolled_back=False, waiting=tuple(waiting))

    def _absent(self, survey: Survey) -> list[Absent]:
        """The survey's absent bindings that wait.

        Not those that clash (the clash is what the operator must fix), nor those served by a
        socket systemd passed in: that one is bound already (FreeBind=, for instance), and
        closing it would lose it for good.
        """
        if not survey.absent:
            return []
        clashing = survey.clashing if survey.clashes else frozenset()
        return [
            item
            for item in survey.absent
            if item.binding not in clashing
            and item.binding not in self._adopted
            and not (
                item.binding.name in self._inherited_names and item.binding.name in self.served
            )
        ]

    def _open(self, binding: Binding) -> tuple[Served | None, Failure | None]:
        """Bind (or adopt) one socket and register it; a failure is returned, not raised."""
        adopted = self._take_inherited(binding)
        try:
            sock, granted = adopted if adopted is not None else self._bind(binding)
        except BindError as error:
            reason = error.meaning
            if error.errno == errno.EADDRINUSE:
                # The survey found no clash, so another socket appeared since: name its holder.
                reason = self._holder_of(binding) or reason
            return None, Failure(binding.listener, str(binding.name), reason, error.errno_name)
        granted = self._granted.setdefault(granted, granted)
        served = Served(binding, sock, granted, broadcast=self._broadcast)
        self._selector.register(sock, selectors.EVENT_READ, served)
        if adopted is not None:
            self._inherited_names.add(binding.name)
        log.info(
            "listener_bound",
            listener=binding.listener.name,
            socket=str(binding.name),
            responder=binding.listener.responder.value,
            recv_buffer=granted,
            inherited=adopted is not None,
        )
        return served, None

    def _relabel(self, old: Served, binding: Binding) -> Served:
        """The same socket and counters with ``binding``'s per-packet settings and labels.

        A new object, not ``old.configure``: ``old`` may be in the published snapshot, which
        must show the old labels until the new snapshot replaces it as a whole.
        """
        # The old guard goes along: its rate-limit buckets are kept if the limit is unchanged.
        new = Served(binding, old.sock, old.recv_buffer, old.stats, old.guard, self._broadcast)
        self._selector.modify(old.sock, selectors.EVENT_READ, new)
        log.info(
            "listener_relabelled",
            listener=binding.listener.name,
            previous=old.binding.listener.name,
            socket=str(binding.name),
            responder=binding.listener.responder.value,
            drop_rate=binding.listener.drop_rate,
        )
        return new

    def _detach(self, name: SocketName) -> Served:
        served = self.served.pop(name)
        self._selector.unregister(served.sock)
        served.close()
        return served

    def _retire(self, name: SocketName) -> Served:
        """Close a serving socket during a reload, answering what is already queued on it."""
        # Datagrams queued on a socket are lost when it closes; answering them first narrows
        # the gap of a swap (127.0.0.1 to 0.0.0.0) to the moment between this read and close.
        self.served[name].drain(self._buffer, self._view)
        return self._detach(name)

    def _rollback(
        self,
        opened: dict[SocketName, Served],
        closed: dict[SocketName, Served],
        order: list[SocketName],
    ) -> tuple[Failure, ...]:
        """Undo a failed transaction: close what it opened, bind again what it closed.

        Returns the old sockets that could not be bound again (another process took their
        name in between); everything else serves exactly as before, in the same order.
        """
        for served in opened.values():
            served.drain(self._buffer, self._view)
            self._selector.unregister(served.sock)
            served.sock.close()
        lost: list[Failure] = []
        for name, old in closed.items():
            restored, failure = self._open(old.binding)
            if restored is None:
                assert failure is not None  # noqa: S101 - _open returns one or the other
                log.error(
                    "rollback_rebind_failed",
                    listener=old.binding.listener.name,
                    socket=str(name),
                    errno=failure.errno_name or None,
                    error=failure.reason,
                )
                lost.append(failure)
                continue
            restored.stats = old.stats
            self.served[name] = restored
        self.served = {name: self.served[name] for name in order if name in self.served}
        return tuple(lost)

    def _assign_inherited(self, survey: Survey) -> None:
        """Match the passed sockets to bindings; report and close those that serve none.

        Closed before anything is bound: a listener may then bind that name itself (the
        survey counted these sockets as udpbindd's own, not as clashes).
        """
        if not self._inherited:
            return
        assignment = assign(self._inherited, survey.expansion.bindings)
        for unmatched in assignment.unmatched:
            item = unmatched.item
            log.warning(
                "inherited_unmatched",
                fdname=item.fdname,
                socket=str(item.name),
                detail=f"{unmatched.reason}; closing it",
            )
            item.sock.close()
            self._inherited.remove(item)
        self._adopted = assignment.adopted

    def _take_inherited(self, binding: Binding) -> tuple[socket.socket, int] | None:
        """The passed socket ``assign`` chose for ``binding``, if any (at start only)."""
        item = self._adopted.pop(binding, None)
        if item is None:
            if self._activated:
                # Socket activation is in use, yet nothing was passed for this binding.
                log.warning(
                    "listener_not_inherited",
                    listener=binding.listener.name,
                    socket=str(binding.name),
                    detail="no passed socket has this socket name; binding it",
                )
            return None
        self._inherited.remove(item)
        log.info(
            "listener_inherited",
            listener=binding.listener.name,
            socket=str(binding.name),
            fdname=item.fdname,
            matched_by="name" if item.fdname == binding.listener.name else "address",
        )
        # Prepared as open_udp prepares the sockets udpbindd opens itself.
        enable_error_queue(item.sock)
        return item.sock, set_receive_buffer(item.sock, binding.listener.recv_buffer)

    def _adopt_leftovers(self) -> None:
        """Passed sockets whose binding was not served (it clashed, or start failed) are closed.

        After start nothing more is passed: later listeners (a reload) are simply bound.
        """
        for item in self._inherited:
            log.warning(
                "inherited_unmatched",
                fdname=item.fdname,
                socket=str(item.name),
                detail="its listener is not served; closing it",
            )
            item.sock.close()
        self._inherited.clear()
        self._adopted.clear()
        self._activated = False

    def _holder_of(self, binding: Binding) -> str:
        """Explain an EADDRINUSE from bind() by the socket that now holds the name, if found."""
        try:
            fresh = self._survey([binding.listener], exclude_inodes=self.own_inodes())
        except OSError:
            return ""
        for clash in fresh.clashes:
            if clash.binding.name == binding.name:
                return _clash_failure(clash).reason
        return ""

    def reload(self) -> None:
        """Re-read the configuration and apply it; any failure leaves the serving set as it was.

        The cyclic collector is paused meanwhile: reading and surveying thousands of listeners
        builds long-lived objects that it would otherwise scan over and over.
        """
        with collection_paused():
            self._reload()

    def _reload(self) -> None:
        """The reload itself.

        Around it, sd_notify gets ``RELOADING=1`` with ``MONOTONIC_USEC`` first and
        ``READY=1`` with a ``STATUS`` last, whatever happens in between. Every reload, good or
        failed, ends with one ``reload_finished`` summary event.
        """
        began = time.monotonic()
        if self._ready:  # before READY=1, systemd is still waiting for the start to finish
            self.notifier.reloading()
        log.info("reload_started")
        if self._loader is None:
            self._reload_failed("no configuration file to read again", began, failed=1)
            return
        try:
            config = self._loader()
        except ConfigError as error:
            problems = error.problems
        else:
            problems = ()
        if problems:
            for problem in problems:
                log.error("config_problem", problem=str(problem))
            reason = f"invalid configuration: {problems[0]}"
            self._reload_failed(reason, began, failed=len(problems))
            return
        loaded = time.monotonic()
        try:
            survey = self._survey(
                config.enabled_listeners,
                exclude_inodes=self.own_inodes(),
                interfaces=self._addresses(),
            )
        except OSError as error:
            self._reload_failed(f"cannot read the host's sockets: {error}", began, failed=1)
            return
        surveyed = time.monotonic()
        outcome = self.apply(survey)
        self._log_failures(outcome, only_optional=not outcome.rolled_back)
        if outcome.rolled_back:
            # Sockets the rollback could not bind again are down now: say so everywhere.
            self.failures = [*self.failures, *outcome.lost]
            reason = str(outcome.required_failures[0])
            if outcome.lost:
                reason += f"; {len(outcome.lost)} previous socket(s) could not be bound again"
            self._reload_failed(reason, began, failed=len(outcome.failures))
            return
        if config.metrics != self.config.metrics:
            log.warning("metrics_listen_unchanged", detail="metrics.listen applies at restart")
        self.config = config
        self._choose_io(config.io)
        self.failures = list(outcome.failures)
        self.waiting = list(outcome.waiting)
        self.reload_ok, self.reload_timestamp = True, time.time()
        self._settle(log_failures=False)
        plan, done = outcome.plan, time.monotonic()
        log.info(
            "reload_finished",
            ok=True,
            # A new socket that failed (required: false) counts as failed, not as added.
            added=sum(1 for binding in plan.add if binding.name in self.served),
            removed=len(plan.remove),
            kept=len(plan.keep),
            rebound=sum(1 for binding in plan.rebind if binding.name in self.served),
            relabelled=len(plan.relabel),
            failed=len(outcome.failures),
            seconds=round(done - began, 6),
            load_seconds=round(loaded - began, 6),
            survey_seconds=round(surveyed - loaded, 6),
            apply_seconds=round(done - surveyed, 6),
        )
        self._reloaded(self.status_text())

    def _reloaded(self, status: str) -> None:
        """End a reload towards systemd: READY=1 once started, before that only a STATUS=."""
        self._status = status
        if self._ready:
            self.notifier.ready(status)
        else:
            self.notifier.status(status)

    def _reload_failed(self, reason: str, began: float, *, failed: int) -> None:
        """End a reload that changed nothing: log why, publish reload_ok 0, tell systemd."""
        self.reload_ok = False
        self._publish()
        log.error("reload_failed", reason=reason, serving=len(self.served))
        log.info(
            "reload_finished",
            ok=False,
            added=0,
            removed=0,
            kept=len(self.served),
            rebound=0,
            relabelled=0,
            failed=failed,
            seconds=round(time.monotonic() - began, 6),
        )
        self._reloaded(f"reload failed, still serving the previous set: {reason}"[:400])

    def _log_failures(self, outcome: Outcome, *, only_optional: bool) -> None:
        for failure in outcome.failures:
            if only_optional and failure.required:
                continue
            log.error(
                "bind_failed" if failure.errno_name else "listener_unavailable",
                listener=failure.listener.name,
                socket=failure.socket,
                required=failure.required,
                errno=failure.errno_name or None,
                error=failure.reason,
            )

    # -- following the interfaces -------------------------------------------------------------

    def refresh(self) -> None:
        """Apply the current configuration again, to the interfaces as they are now."""
        with collection_paused():
            self._refresh()

    def _refresh(self) -> None:
        """Apply the current configuration again, to the interfaces as they are now.

        Runs when the interface table changed and when a failed socket's retry is due.
        Sockets whose address or device went away are closed and wait; waiting ones that can
        be bound now are; a new socket that clashes or fails is failed, alone: nothing is
        rolled back and nothing stops the daemon. No RELOADING=1/READY=1 and no reload
        metrics: the configuration is the same.
        """
        self._dirty = False
        began = time.monotonic()
        stale = self._retire_stale()
        serving = {name: served.binding.listener.name for name, served in self.served.items()}
        try:
            survey = self._survey(
                self.config.enabled_listeners,
                interfaces=self._addresses(),
                exclude_inodes=self.own_inodes(),
                serving=serving,
            )
        except OSError as error:
            # Tried again on the failed sockets' schedule, or at the next interface change.
            log.warning(
                "refresh_failed", error=f"cannot read the host's interfaces or sockets: {error}"
            )
            self._watch_retry = began + states.RETRY_FIRST
            return
        before = self._entries
        outcome = self.apply(survey, strict=False)
        self.failures = list(outcome.failures)
        self.waiting = list(outcome.waiting)
        for name, old in stale.items():
            new = self.served.get(name)
            if new is not None:
                new.stats = old.stats  # the same socket name on the re-created interface
        self._settle(log_failures=True)
        if stale or outcome.plan.changes or self._entries != before:
            plan = outcome.plan
            log.info(
                "listeners_refreshed",
                added=sum(1 for binding in plan.opens if binding.name in self.served),
                removed=len(plan.remove),
                bound=len(self.served),
                waiting=len(self.waiting),
                failed=len(self.failures),
                seconds=round(time.monotonic() - began, 6),
            )
        if self._ready and self.status_text() != self._status:
            self._status = self.status_text()
            self.notifier.status(self._status)

    def _retire_stale(self) -> dict[SocketName, Served]:
        """Close sockets held to an interface that was deleted and created again since.

        SO_BINDTODEVICE and a link-local scope hold the interface's index; the new interface
        of the same name has another, so such a socket would never receive again. Closed
        here, they are bound again by the apply that follows, keeping their counters.
        """
        if self._watch is None:
            return {}
        stale: dict[SocketName, Served] = {}
        for name, index in self._device_index.items():
            now = self._watch.index(name.device)
            if name in self.served and now is not None and now != index:
                stale[name] = self._retire(name)
                # Bound again below, it will hold the new index.
                log.info(
                    "listener_closed",
                    listener=stale[name].binding.listener.name,
                    socket=str(name),
                    reason=f"interface {name.device} was created again",
                )
        for name in stale:
            del self._device_index[name]
        return stale

    def _settle(self, *, log_failures: bool) -> None:
        """Take in the new states: log what changed, schedule retries, publish.

        A state is logged when it changes (or its reason does), not on every apply: bound
        sockets by ``listener_bound``, waiting ones by ``listener_waiting``, failed ones by
        ``bind_failed`` (when ``log_failures``; start and reload log theirs as before).
        """
        now = time.monotonic()
        entries = self.unbound()
        changed = dict(states.changes(self._entries, entries))
        self._backoff.update(
            (key for key, entry in entries.items() if entry.state == states.FAILED), now
        )
        for item in self.waiting:
            if (item.listener.name, item.socket) in changed:
                log.info(
                    "listener_waiting",
                    listener=item.listener.name,
                    socket=item.socket,
                    required=item.required,
                    reason=item.reason,
                )
        for failure in self.failures if log_failures else ():
            key = (failure.listener.name, failure.socket)
            if key in changed:
                log.error(
                    "bind_failed" if failure.errno_name else "listener_unavailable",
                    listener=failure.listener.name,
                    socket=failure.socket,
                    required=failure.required,
                    errno=failure.errno_name or None,
                    error=failure.reason,
                    retry_seconds=self._backoff.delay(key, now),
                )
        self._entries = entries
        if self._watch is not None:
            indexes = {}
            for name in self.served:
                if name.device:
                    index = self._device_index.get(name, self._watch.index(name.device))
                    if index is not None:
                        indexes[name] = index
            self._device_index = indexes
        self._publish()
        self._schedule()

    def _read_watch(self) -> None:
        """Read the interface events waiting; a change is applied at the end of this pass."""
        assert self._watch is not None  # noqa: S101 - only registered once it exists
        try:
            changed = self._watch.read()
        except OSError as error:
            log.warning("interface_watch_failed", error=str(error))
            self._watch_retry = time.monotonic() + states.RETRY_FIRST
            self._schedule()
            return
        self._follow_broadcasts()
        if changed:
            self._dirty = True

    def _follow_broadcasts(self) -> None:
        """Give every served socket's guard the interface table's subnet broadcasts, when they
        changed (an address came or went): refused as sources from the next datagram on."""
        assert self._watch is not None  # noqa: S101 - called only once it exists
        broadcast = self._watch.broadcasts()
        if broadcast == self._broadcast:
            return
        log.debug(
            "subnet_broadcasts_changed",
            added=sorted(str(address) for address in broadcast - self._broadcast),
            removed=sorted(str(address) for address in self._broadcast - broadcast),
        )
        self._broadcast = broadcast
        for served in self.served.values():
            served.set_broadcast(broadcast)

    def _schedule(self) -> None:
        """When the loop must wake up on its own: a retry, a start-up extension or deadline."""
        times = [self._backoff.due(), self._watch_retry]
        if not self._ready and self._running:
            times += [self._next_extend, self._deadline]
        self._timer = min((t for t in times if t is not None), default=None)

    def _tick(self) -> None:
        """Timers and interface changes, once per loop pass when any is due."""
        now = time.monotonic()
        if self._watch_retry is not None and now >= self._watch_retry:
            self._watch_retry = None
            if self._watch is not None and self._watch.lost:
                self._read_watch()
            else:
                self._dirty = True
        due = self._backoff.due()
        if self._dirty or (due is not None and now >= due):
            self.refresh()
        if not self._ready:
            self._start_gate(time.monotonic())
        self._schedule()

    def _holding(self) -> list[Waiting | Failure]:
        """Required listener sockets that are not bound: they hold READY=1 back."""
        items: list[Waiting | Failure] = [*self.waiting, *self.failures]
        return [item for item in items if item.required]

    def _start_gate(self, now: float) -> None:
        """Send READY=1 once nothing required waits; extend the start-up while something does.

        Raises:
            StartFailed: a required socket has waited its listener's whole ``bind_timeout``.
        """
        holding = self._holding()
        gate = states.gate(
            (
                states.Holding(i.listener.name, i.socket, i.reason, i.listener.bind_timeout)
                for i in holding
            ),
            self._started,
            now,
        )
        self._deadline = gate.deadline
        if gate.ready:
            self._ready = True
            self._status = self.status_text()
            self.notifier.ready(self._status)
            if self._next_extend:  # it did wait: say for how long
                log.info("ready", waited_seconds=round(now - self._started, 3))
            return
        if gate.expired:
            expired = {(item.listener, item.socket) for item in gate.expired}
            raise StartFailed(
                [
                    _timed_out(item)
                    for item in holding
                    if (item.listener.name, item.socket) in expired
                ]
            )
        if now >= self._next_extend:
            assert gate.deadline is not None  # noqa: S101 - set whenever not ready
            first = holding[0]
            self._status = (
                f"{self.status_text()}; starting: waiting for listener {first.listener.name!r} "
                f"({first.socket}), at most {max(0.0, gate.deadline - now):.0f} s more"
            )[:400]
            self.notifier.extend_timeout(states.extend_usec(now, gate.deadline), self._status)
            if not self._next_extend:
                log.info(
                    "start_waiting",
                    listener=first.listener.name,
                    socket=first.socket,
                    reason=first.reason,
                    holding=len(holding),
                    bind_timeout=first.listener.bind_timeout,
                )
            self._next_extend = now + states.EXTEND_INTERVAL

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until stopped. Returns after every socket is closed.

        READY=1 is sent once every required listener is bound: at once, or, while one waits
        for its address or interface, when it is bound; until then EXTEND_TIMEOUT_USEC keeps
        systemd waiting.

        Raises:
            StartFailed: a required listener still was not bound when its ``bind_timeout``
                ran out; READY=1 was never sent and every socket is closed.
        """
        self._running = True
        interval = watchdog_interval()
        log.info(
            "started",
            bound=len(self.served),
            waiting=len(self.waiting),
            failed=len(self.failures),
            io=self.io.value,
        )
        select = self._selector.ready
        timeout: float | None = None
        next_ping = 0.0
        start_failed = False
        try:
            self._start_gate(time.monotonic())
            self._schedule()
            while self._running:
                if interval is not None:
                    # Pinged from the loop itself, so a stuck loop stops the pings; at most once
                    # per interval, however busy the sockets keep the loop.
                    now = time.monotonic()
                    if now >= next_ping:
                        self.notifier.watchdog()
                        next_ping = now + interval
                    timeout = next_ping - now
                if self._dirty:
                    timeout = 0.0
                elif self._timer is not None:
                    left = max(0.0, self._timer - time.monotonic())
                    timeout = left if timeout is None else min(timeout, left)
                self._serve(select(timeout))
                if (
                    self._dirty
                    or not self._ready  # start-up: a reload may have let READY=1 go
                    or (self._timer is not None and time.monotonic() >= self._timer)
                ):
                    self._tick()
                timeout = None
        except StartFailed:
            start_failed = True
            raise
        finally:
            if not start_failed:
                self.notifier.stopping()
            self.close()
            log.info("stopped")

    def _serve(self, ready: list[Served | _Own]) -> None:
        """One pass over the files ``ready`` found ready: drain each socket within its budget."""
        buffer, view = self._buffer, self._view
        # Read per pass: a reload can switch between batched and plain.
        fast = self._batch
        if len(ready) >= SPREAD:
            fast, budget = None, 1
        else:
            budget = DRAIN_BUDGET
        for served in ready:
            # Listener sockets first, by type: reading an enum member is slow in Python 3.11,
            # and only the daemon's own two files are marked with one.
            if isinstance(served, Served):
                if fast is None:
                    served.drain(buffer, view, budget)
                else:
                    served.drain_batched(fast, buffer, view)
            elif served is _Own.WAKE:
                self._wakeup()
                # A reload may have closed sockets of this pass: select again.
                return
            elif served is _Own.WATCH:
                self._read_watch()

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

    def close(self) -> None:
        for name in list(self.served):
            self._detach(name)
        self._publish()

    def shutdown(self) -> None:
        """Release the selector and the wake-up pair (after ``run`` or a failed ``start``)."""
        self.close()
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
        self.notifier.close()


def _without_clashes(survey: Survey) -> list[Binding]:
    """The survey's bindings that clash with nothing, in order.

    A clash names the very binding object the check was given, so identity finds them
    without hashing every binding (costly with 10,000 listeners); equality is the fallback
    for a surveyor that built its clashes from copies.
    """
    bindings = survey.expansion.bindings
    if not survey.clashes:
        return list(bindings)
    clashing = {id(clash.binding) for clash in survey.clashes}
    wanted = [binding for binding in bindings if id(binding) not in clashing]
    if len(wanted) + len(clashing) == len(bindings):
        return wanted
    by_value = {clash.binding for clash in survey.clashes}
    return [binding for binding in bindings if binding not in by_value]


def _excluding(bindings: list[Binding], excluded: list[Binding]) -> list[Binding]:
    """``bindings`` without ``excluded`` (a subset of them), by identity as ``_without_clashes``."""
    if not excluded:
        return bindings
    ids = {id(binding) for binding in excluded}
    kept = [binding for binding in bindings if id(binding) not in ids]
    if len(kept) + len(ids) == len(bindings):
        return kept
    by_value = set(excluded)
    return [binding for binding in bindings if binding not in by_value]


def _timed_out(item: Waiting | Failure) -> Failure:
    """What a required socket still not bound at the end of its ``bind_timeout`` reports."""
    timeout = f"{item.listener.bind_timeout:g} s (bind_timeout)"
    if isinstance(item, Waiting):
        return Failure(item.listener, item.socket, f"still waiting after {timeout}: {item.reason}")
    reason = f"still failing after {timeout}: {item.reason}"
    return Failure(item.listener, item.socket, reason, item.errno_name)


def _clash_failure(clash: Clash) -> Failure:
    binding = clash.binding
    assumed = "" if clash.certain else " (assumed: see udpbindd check)"
    reason = f"address already in use: clashes with {clash.other_label}: {clash.why}{assumed}"
    return Failure(binding.listener, str(binding.name), reason, "EADDRINUSE")
