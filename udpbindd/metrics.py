"""Prometheus metrics: one custom collector that reads the loop's plain counters at scrape time.

Nothing here is touched per packet. The collector takes a snapshot callable and converts what
it returns into metric families; ``MetricsServer`` runs prometheus-client's WSGI exposition app
on each configured address in a daemon thread, with optional TLS from the stdlib ``ssl`` module.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from wsgiref.simple_server import WSGIRequestHandler, make_server

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from udpbindd import __version__
from udpbindd.config import Endpoint, MetricsTLS
from udpbindd.expand import Binding
from udpbindd.names import address_text
from udpbindd.stats import DROP_REASONS as COUNTED_REASONS
from udpbindd.stats import Stats

log = structlog.get_logger("udpbindd")

LABELS = ("listener", "socket")
# udpbindd_listener_state: one series per state, 1 for the state the socket is in.
LISTENER_STATES = ("bound", "waiting", "failed")
# Every reason is exported from the start (as 0), so rate() and alerts work before a first drop:
# those the loop counts, plus "kernel", which is read from the socket.
DROP_REASONS = tuple(dict.fromkeys(("simulated", "kernel", *COUNTED_REASONS)))
# A connection that sends nothing (or stalls its TLS handshake) holds a thread only this long.
CONNECTION_TIMEOUT = 30.0


class Bound(Protocol):
    """What the collector reads of a serving binding."""

    @property
    def binding(self) -> Binding: ...
    @property
    def stats(self) -> Stats: ...
    @property
    def recv_buffer(self) -> int: ...
    def kernel_drops(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class Down:
    """A listener's socket that is not serving, exported as udpbindd_listener_up 0.

    ``state`` is ``waiting`` (its address or interface is absent) or ``failed``.
    """

    listener: str
    socket: str
    state: str = "failed"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one scrape reports, taken at once from the daemon's state."""

    bound: Sequence[Bound] = ()
    down: Sequence[Down] = ()
    reload_ok: bool = True
    reload_timestamp: float = 0.0


class _Families:
    """The metric families of one scrape, empty until filled from a snapshot."""

    def __init__(self, build_version: str) -> None:
        def counter(name: str, text: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"udpbindd_{name}", text, labels=LABELS)

        self.received_packets = counter("received_packets", "Datagrams received, per binding.")
        self.received_bytes = counter("received_bytes", "Payload bytes received, per binding.")
        self.sent_packets = counter("sent_packets", "Replies sent, per binding.")
        self.sent_bytes = counter("sent_bytes", "Payload bytes sent in replies, per binding.")
        self.dropped = CounterMetricFamily(
            "udpbindd_dropped_packets",
            "Datagrams received but not answered, or discarded by the kernel, by reason.",
            labels=(*LABELS, "reason"),
        )
        self.evictions = counter(
            "rate_limit_evictions",
            "Sources the rate limiter stopped tracking to stay within max_sources, per binding.",
        )
        self.up = GaugeMetricFamily(
            "udpbindd_listener_up", "1 when the socket is bound and served, else 0.", labels=LABELS
        )
        self.state = GaugeMetricFamily(
            "udpbindd_listener_state",
            "1 for the state each socket is in (bound, waiting for its address or interface, "
            "or failed), 0 for the others.",
            labels=(*LABELS, "state"),
        )
        self.info = InfoMetricFamily(
            "udpbindd_listener", "Static facts of each bound socket.", labels=LABELS
        )
        self.recv_buffer = GaugeMetricFamily(
            "udpbindd_receive_buffer_bytes",
            "Receive buffer the kernel granted (SO_RCVBUF read back), per binding.",
            labels=LABELS,
        )
        self.reload_ok = GaugeMetricFamily(
            "udpbindd_config_last_reload_successful",
            "1 when the last configuration load or reload succeeded.",
        )
        self.reload_timestamp = GaugeMetricFamily(
            "udpbindd_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load or reload.",
        )
        self.build = InfoMetricFamily("udpbindd_build", "udpbindd version.")
        self.build.add_metric([], {"version": build_version})

    def all(self) -> tuple[Metric, ...]:
        return (
            self.received_packets,
            self.received_bytes,
            self.sent_packets,
            self.sent_bytes,
            self.dropped,
            self.evictions,
            self.up,
            self.state,
            self.info,
            self.recv_buffer,
            self.reload_ok,
            self.reload_timestamp,
            self.build,
        )

    def add_bound(self, bound: Bound) -> None:
        binding, stats = bound.binding, bound.stats
        name = binding.name
        labels = [binding.listener.name, str(name)]
        self.received_packets.add_metric(labels, stats.received_packets)
        self.received_bytes.add_metric(labels, stats.received_bytes)
        self.sent_packets.add_metric(labels, stats.sent_packets)
        self.sent_bytes.add_metric(labels, stats.sent_bytes)
        reasons = stats.dropped()
        kernel = bound.kernel_drops()
        for reason in DROP_REASONS:
            if reason != "kernel":
                self.dropped.add_metric([*labels, reason], reasons.get(reason, 0))
            elif kernel is not None:
                self.dropped.add_metric([*labels, reason], kernel)
            # else: the socket was closed under this scrape (a reload). Leaving the sample out
            # for one scrape is harmless; a 0 would read as a counter reset, and increase()
            # would count every earlier drop again.
        self.evictions.add_metric(labels, stats.rate_limit_evictions)
        self.up.add_metric(labels, 1)
        self.add_state(labels, "bound")
        family = "ipv4" if name.family == 4 else ("dual" if name.dual_stack else "ipv6")
        self.info.add_metric(
            labels,
            {
                "address": address_text(name.address),
                "port": str(name.port),
                "family": family,
                "device": name.device,
                "responder": binding.listener.responder.value,
            },
        )
        self.recv_buffer.add_metric(labels, bound.recv_buffer)

    def add_state(self, labels: list[str], current: str) -> None:
        for state in LISTENER_STATES:
            self.state.add_metric([*labels, state], 1 if state == current else 0)


@dataclass(slots=True, eq=False)  # registries keep collectors in sets: hash by identity
class UdpbinddCollector:
    """Converts a ``Snapshot`` into metric families; registered in a dedicated registry."""

    snapshot: Callable[[], Snapshot]
    build_version: str = field(default=__version__)

    def describe(self) -> Iterable[Metric]:
        # The names without samples: the registry learns what this collector exports (so
        # /metrics?name[]=... finds it) without taking a snapshot at registration.
        return _Families(self.build_version).all()

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        families = _Families(self.build_version)
        seen: set[tuple[str, str]] = set()
        for bound in snap.bound:
            families.add_bound(bound)
            seen.add((bound.binding.listener.name, str(bound.binding.name)))
        for down in snap.down:
            # A repeated series would make Prometheus reject the sample; one per socket.
            if (down.listener, down.socket) not in seen:
                seen.add((down.listener, down.socket))
                families.up.add_metric([down.listener, down.socket], 0)
                families.add_state([down.listener, down.socket], down.state)
        families.reload_ok.add_metric([], 1 if snap.reload_ok else 0)
        families.reload_timestamp.add_metric([], snap.reload_timestamp)
        yield from families.all()


def make_registry(snapshot: Callable[[], Snapshot]) -> CollectorRegistry:
    """A dedicated registry: udpbindd's collector plus the process and platform collectors."""
    # auto_describe lets ``name[]`` filters find the process and platform collectors too; ours
    # describes itself without collecting.
    registry = CollectorRegistry(auto_describe=True)
    registry.register(UdpbinddCollector(snapshot))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class _QuietHandler(WSGIRequestHandler):
    """Logs nothing per request (a scrape every few seconds is not news)."""

    def log_message(self, format: str, *args: object) -> None:
        return


class MetricsError(Exception):
    """The metrics endpoint could not be served; the message says where and why."""


def tls_context(tls: MetricsTLS) -> ssl.SSLContext:
    """A server context: TLS 1.2 or newer; with ``client_ca``, client certificates required.

    Raises:
        MetricsError: a file is missing or unreadable, or the key does not match the cert.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # ssl's errors do not name the file: the message does, for the operator.
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as error:
        raise MetricsError(
            f"cannot load the metrics TLS files: cert {tls.cert}, key {tls.key}: {error}"
        ) from None
    if tls.client_ca:
        try:
            context.load_verify_locations(cafile=tls.client_ca)
        except (OSError, ssl.SSLError) as error:
            raise MetricsError(
                f"cannot load the metrics TLS files: client_ca {tls.client_ca}: {error}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class _Server(ThreadingWSGIServer):
    """prometheus-client's threading WSGI server, hardened for a long-running daemon."""

    tls: ssl.SSLContext | None = None

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # Explicit, so "[::]:9917" can sit beside "0.0.0.0:9917" whatever
            # net.ipv6.bindv6only says.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # TCPServer's bind, not HTTPServer's: that one looks the host name up (getfqdn), which
        # can wait on DNS while systemd waits for READY.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        self.setup_environ()

    def get_request(self) -> tuple[socket.socket, object]:
        conn, address = super().get_request()
        # A client that connects and then sends nothing must not hold a thread for ever.
        conn.settimeout(CONNECTION_TIMEOUT)
        if self.tls is None:
            return conn, address
        try:
            # The handshake runs in the request thread (finish_request), not the accept loop.
            wrapped = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        except OSError:
            conn.close()
            raise
        return wrapped, address

    def finish_request(self, request: object, client_address: object) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError):
                return  # plain HTTP, or a client without a valid certificate: refused
        super().finish_request(request, client_address)  # type: ignore[arg-type]

    def handle_error(self, request: object, client_address: object) -> None:
        # socketserver prints a traceback to stderr; a client that vanishes mid-scrape or
        # times out is routine for a daemon, worth a debug event at most.
        log.debug(
            "metrics_request_failed", client=str(client_address), error=str(sys.exc_info()[1])
        )


class MetricsServer:
    """One HTTP(S) server per configured endpoint, each in a daemon thread."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._app = make_wsgi_app(registry)
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []

    def start(self, endpoints: Sequence[Endpoint], tls: MetricsTLS | None = None) -> None:
        """Bind every endpoint, then serve. An empty ``endpoints`` serves nothing.

        Raises:
            MetricsError: an endpoint could not be bound or the TLS files loaded; whatever
                was opened is closed again.
        """
        if not endpoints:
            return  # the endpoint is off: TLS files are not even read
        # Loaded before any bind, so a bad file fails startup with nothing left open.
        context = tls_context(tls) if tls is not None else None
        for endpoint in endpoints:
            try:
                self._servers.append(self._bind(endpoint, context))
            except OSError as error:
                self.stop()
                raise MetricsError(
                    f"cannot serve metrics on {endpoint}: {error.strerror or error}"
                ) from None
        for server in self._servers:
            thread = threading.Thread(
                target=server.serve_forever, name="udpbindd-metrics", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _bind(self, endpoint: Endpoint, context: ssl.SSLContext | None) -> _Server:
        family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET

        class Server(_Server):
            address_family = family
            tls = context

        return make_server(endpoint.host, endpoint.port, self._app, Server, _QuietHandler)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) each server is bound to, in the order of the endpoints."""
        return [(str(s.server_address[0]), int(s.server_address[1])) for s in self._servers]

    def stop(self) -> None:
        """Stop serving and close every listening socket; safe to call more than once."""
        for server in self._servers[: len(self._threads)]:
            server.shutdown()  # only for servers whose serve_forever runs
        for server in self._servers:
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()
