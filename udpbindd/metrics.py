"""Prometheus metrics: one custom collector that reads the loop's plain counters at scrape time.

Nothing here is touched per packet. The collector takes a snapshot callable and converts what
it returns into metric families; ``serve`` runs prometheus-client's WSGI exposition app on
each configured address in a daemon thread, with optional TLS.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from wsgiref.simple_server import WSGIRequestHandler, make_server

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
from udpbindd.stats import Stats

LABELS = ("listener", "socket")
# Every reason is exported from the start (as 0), so rate() and alerts work before a first drop.
DROP_REASONS = ("simulated", "kernel", "send_error")


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
    """A listener's socket that is not serving, exported as udpbindd_listener_up 0."""

    listener: str
    socket: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one scrape reports, taken at once from the daemon's state."""

    bound: Sequence[Bound] = ()
    down: Sequence[Down] = ()
    reload_ok: bool = True
    reload_timestamp: float = 0.0


@dataclass(slots=True, eq=False)  # registries keep collectors in sets: hash by identity
class UdpbinddCollector:
    """Converts a ``Snapshot`` into metric families; registered in a dedicated registry."""

    snapshot: Callable[[], Snapshot]
    build_version: str = field(default=__version__)

    def describe(self) -> Iterable[Metric]:
        # Describing from a real collect would take a snapshot at registration; an empty
        # description keeps registration free of side effects.
        return ()

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        counters = {
            name: CounterMetricFamily(f"udpbindd_{name}", text, labels=LABELS)
            for name, text in (
                ("received_packets", "Datagrams received, per binding."),
                ("received_bytes", "Payload bytes received, per binding."),
                ("sent_packets", "Replies sent, per binding."),
                ("sent_bytes", "Payload bytes sent in replies, per binding."),
            )
        }
        dropped = CounterMetricFamily(
            "udpbindd_dropped_packets",
            "Datagrams received but not answered, or discarded by the kernel, by reason.",
            labels=(*LABELS, "reason"),
        )
        up = GaugeMetricFamily(
            "udpbindd_listener_up", "1 when the socket is bound and served, else 0.", labels=LABELS
        )
        info = InfoMetricFamily(
            "udpbindd_listener",
            "Static facts of each bound socket.",
            labels=(*LABELS, "address", "port", "family", "device", "responder"),
        )
        rcvbuf = GaugeMetricFamily(
            "udpbindd_receive_buffer_bytes",
            "Receive buffer the kernel granted (SO_RCVBUF read back), per binding.",
            labels=LABELS,
        )
        for bound in snap.bound:
            binding, stats = bound.binding, bound.stats
            labels = [binding.listener.name, str(binding.name)]
            counters["received_packets"].add_metric(labels, stats.received_packets)
            counters["received_bytes"].add_metric(labels, stats.received_bytes)
            counters["sent_packets"].add_metric(labels, stats.sent_packets)
            counters["sent_bytes"].add_metric(labels, stats.sent_bytes)
            reasons = stats.dropped()
            reasons["kernel"] = bound.kernel_drops() or 0
            for reason in DROP_REASONS:
                dropped.add_metric([*labels, reason], reasons.get(reason, 0))
            up.add_metric(labels, 1)
            name = binding.name
            family = "ipv4" if name.family == 4 else ("dual" if name.dual_stack else "ipv6")
            info.add_metric(
                labels,
                {
                    "address": address_text(name.address),
                    "port": str(name.port),
                    "family": family,
                    "device": name.device,
                    "responder": binding.listener.responder.value,
                },
            )
            rcvbuf.add_metric(labels, bound.recv_buffer)
        for down in snap.down:
            up.add_metric([down.listener, down.socket], 0)
        yield from counters.values()
        yield dropped
        yield up
        yield info
        yield rcvbuf
        reload_ok = GaugeMetricFamily(
            "udpbindd_config_last_reload_successful",
            "1 when the last configuration load or reload succeeded.",
            value=1 if snap.reload_ok else 0,
        )
        yield reload_ok
        yield GaugeMetricFamily(
            "udpbindd_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load or reload.",
            value=snap.reload_timestamp,
        )
        build = InfoMetricFamily("udpbindd_build", "udpbindd version.")
        build.add_metric([], {"version": self.build_version})
        yield build


def make_registry(snapshot: Callable[[], Snapshot]) -> CollectorRegistry:
    """A dedicated registry: udpbindd's collector plus the process and platform collectors."""
    registry = CollectorRegistry(auto_describe=False)
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
    """A server context: TLS 1.2 or newer; with ``client_ca``, client certificates required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert, tls.key)
        if tls.client_ca:
            context.load_verify_locations(cafile=tls.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as error:
        raise MetricsError(f"cannot load the metrics TLS files: {error}") from None
    return context


class MetricsServer:
    """One HTTP(S) server per configured endpoint, each in a daemon thread."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._app = make_wsgi_app(registry)
        self._servers: list[ThreadingWSGIServer] = []
        self._threads: list[threading.Thread] = []

    def start(self, endpoints: Sequence[Endpoint], tls: MetricsTLS | None = None) -> None:
        """Bind every endpoint, then serve.

        Raises:
            MetricsError: an endpoint could not be bound or the TLS files loaded; whatever
                was opened is closed again.
        """
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

    def _bind(self, endpoint: Endpoint, context: ssl.SSLContext | None) -> ThreadingWSGIServer:
        family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET

        class Server(ThreadingWSGIServer):
            address_family = family

            def get_request(self) -> tuple[socket.socket, object]:
                conn, address = super().get_request()
                if context is not None:
                    # The handshake runs in the request thread, not the accept loop.
                    conn = context.wrap_socket(
                        conn, server_side=True, do_handshake_on_connect=False
                    )
                return conn, address

            def finish_request(self, request: object, client_address: object) -> None:
                if isinstance(request, ssl.SSLSocket):
                    try:
                        request.do_handshake()
                    except (ssl.SSLError, OSError):
                        return  # a client without a valid certificate: refused, not logged
                super().finish_request(request, client_address)  # type: ignore[arg-type]

        return make_server(endpoint.host, endpoint.port, self._app, Server, _QuietHandler)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [server.server_address[:2] for server in self._servers]  # type: ignore[misc]

    def stop(self) -> None:
        for server in self._servers[: len(self._threads)]:
            server.shutdown()  # only for servers whose serve_forever runs
        for server in self._servers:
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()
