"""The metrics endpoint: the collector on hand-made snapshots, the HTTP(S) server in-process,
and a real ``udpbindd run`` whose scraped counters must equal the traffic the test sent and the
kernel's own drop count.

Pure tests build a fresh registry with ``make_registry(snapshot)``; the golden exposition is
``tests/testdata/metrics-golden.prom`` (process_ and python_ lines left out, the version as
``VERSION``). TLS files are made in a temporary directory with the ``openssl`` command.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port_both, require_tool
from daemonproc import DaemonProcess, exchange, plain_lines
from prometheus import Samples, free_tcp_port, get, samples, scrape, series, value, wait_for
from prometheus_client import CollectorRegistry, generate_latest

from udpbindd import __version__
from udpbindd.config import (
    ConfigError,
    Endpoint,
    Family,
    Listener,
    Literal,
    MetricsTLS,
    Responder,
    Wildcard,
    parse_text,
)
from udpbindd.daemon import Daemon
from udpbindd.expand import Binding
from udpbindd.metrics import (
    DROP_REASONS,
    Down,
    MetricsError,
    MetricsServer,
    Snapshot,
    make_registry,
    tls_context,
)
from udpbindd.names import SocketName
from udpbindd.stats import Stats
from udpbindd.survey import survey

TESTDATA = Path(__file__).parent / "testdata"
GOLDEN = TESTDATA / "metrics-golden.prom"
DEADLINE = 15.0
WriteConfig = Callable[[str], Path]

PER_BINDING = (
    "udpbindd_received_packets_total",
    "udpbindd_received_bytes_total",
    "udpbindd_sent_packets_total",
    "udpbindd_sent_bytes_total",
    "udpbindd_listener_up",
    "udpbindd_listener_info",
    "udpbindd_receive_buffer_bytes",
)


# -- hand-made snapshots ---------------------------------------------------------------------------


@dataclass
class FakeBound:
    """A serving binding as the collector sees it, with fixed numbers."""

    binding: Binding
    stats: Stats
    recv_buffer: int = 212992
    drops: int | None = 0

    def kernel_drops(self) -> int | None:
        return self.drops


def bound(
    name: str,
    address: str,
    port: int,
    *,
    responder: Responder = Responder.SIZE,
    device: str = "",
    family: Family | None = None,
    stats: Stats | None = None,
    recv_buffer: int = 212992,
    drops: int | None = 0,
) -> FakeBound:
    ip = ipaddress.ip_address(address)
    target = Wildcard() if ip.is_unspecified else Literal(ip)
    listener = Listener(
        name, address, target, port, family=family, responder=responder, device=device
    )
    v6only = ip.version == 6 and family is not Family.DUAL
    sock_name = SocketName(ip, port, device=device, v6only=v6only)
    return FakeBound(Binding(listener, sock_name), stats or Stats(), recv_buffer, drops)


def golden_snapshot() -> Snapshot:
    return Snapshot(
        bound=[
            bound(
                "dns",
                "127.0.0.1",
                1060,
                stats=Stats(10, 1000, 9, 190, 1, 0),
                recv_buffer=8388608,
                drops=3,
            ),
            bound(
                "dns6",
                "::1",
                1060,
                responder=Responder.ECHO,
                stats=Stats(5, 500, 5, 500, 0, 0),
                drops=0,
            ),
            bound(
                "any",
                "::",
                1061,
                responder=Responder.DISCARD,
                device="eth0",
                family=Family.DUAL,
                stats=Stats(7, 70, 0, 0, 0, 2),
            ),
        ],
        down=[Down("wan", "192.0.2.1:53")],
        reload_ok=True,
        reload_timestamp=1700000000.0,
    )


def udpbindd_lines(exposition: str) -> str:
    """The exposition without prometheus-client's process_ and python_ families."""
    kept = []
    for line in exposition.splitlines():
        name = line.split(" ")[2] if line.startswith("# ") else line
        if not name.startswith(("process_", "python_")):
            kept.append(line)
    return "\n".join(kept) + "\n"


def exposition(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    promtool = require_tool("promtool")
    return subprocess.run(
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# -- the collector ---------------------------------------------------------------------------------


def test_golden_exposition() -> None:
    text = udpbindd_lines(exposition(make_registry(golden_snapshot)))
    text = text.replace(f'version="{__version__}"', 'version="VERSION"')
    assert text == GOLDEN.read_text()


def test_whole_exposition_passes_promtool_lint() -> None:
    result = promtool_check(exposition(make_registry(golden_snapshot)))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_promtool_would_catch_a_badly_named_counter() -> None:
    # The lint above can fail: a counter without _total is a lint problem (rc 3).
    result = promtool_check("# HELP bad_packets x\n# TYPE bad_packets counter\nbad_packets 1\n")
    assert result.returncode == 3
    assert "bad_packets" in result.stdout + result.stderr


def test_sample_values_come_from_the_snapshot() -> None:
    registry = make_registry(golden_snapshot)
    dns = {"listener": "dns", "socket": "127.0.0.1:1060"}
    get_value = registry.get_sample_value
    assert get_value("udpbindd_received_packets_total", dns) == 10
    assert get_value("udpbindd_received_bytes_total", dns) == 1000
    assert get_value("udpbindd_sent_packets_total", dns) == 9
    assert get_value("udpbindd_sent_bytes_total", dns) == 190
    assert get_value("udpbindd_dropped_packets_total", {**dns, "reason": "simulated"}) == 1
    assert get_value("udpbindd_dropped_packets_total", {**dns, "reason": "kernel"}) == 3
    assert get_value("udpbindd_dropped_packets_total", {**dns, "reason": "send_error"}) == 0
    assert get_value("udpbindd_listener_up", dns) == 1
    assert get_value("udpbindd_receive_buffer_bytes", dns) == 8388608
    info = {"address": "127.0.0.1", "port": "1060", "family": "ipv4", "device": ""}
    assert get_value("udpbindd_listener_info", {**dns, **info, "responder": "size"}) == 1
    dual = {"listener": "any", "socket": "[::]:1061%eth0"}
    info = {"address": "::", "port": "1061", "family": "dual", "device": "eth0"}
    assert get_value("udpbindd_listener_info", {**dual, **info, "responder": "discard"}) == 1
    assert get_value("udpbindd_dropped_packets_total", {**dual, "reason": "send_error"}) == 2
    assert get_value("udpbindd_config_last_reload_successful") == 1
    assert get_value("udpbindd_config_last_reload_success_timestamp_seconds") == 1700000000.0
    assert get_value("udpbindd_build_info", {"version": __version__}) == 1
    assert get_value("python_info", None) is None  # python_info has labels: the family exists
    assert "python_info{" in exposition(registry)
    assert get_value("process_cpu_seconds_total") is not None


def test_every_drop_reason_is_exported_from_zero() -> None:
    registry = make_registry(lambda: Snapshot(bound=[bound("fresh", "127.0.0.1", 1060)]))
    found = samples(exposition(registry))
    exported = [s["reason"] for s in series(found, "udpbindd_dropped_packets_total")]
    assert sorted(exported) == sorted(DROP_REASONS)
    assert {"simulated", "kernel", "send_error"} <= set(DROP_REASONS)
    assert set(Stats().dropped()) <= set(DROP_REASONS)
    for reason in DROP_REASONS:
        labels = {"listener": "fresh", "socket": "127.0.0.1:1060", "reason": reason}
        assert value(found, "udpbindd_dropped_packets_total", **labels) == 0


class NumberedStats(Stats):
    """Counters whose drops by reason are 1, 2, 3... in the order Stats.dropped() lists them."""

    __slots__ = ()

    def dropped(self) -> dict[str, int]:
        return {reason: index for index, reason in enumerate(super().dropped(), start=1)}


def test_every_counted_reason_is_exported_with_its_value() -> None:
    fake = bound("x", "127.0.0.1", 1060, stats=NumberedStats(), drops=99)
    registry = make_registry(lambda: Snapshot(bound=[fake]))
    labels = {"listener": "x", "socket": "127.0.0.1:1060"}
    for reason, count in NumberedStats().dropped().items():
        assert (
            registry.get_sample_value(
                "udpbindd_dropped_packets_total", {**labels, "reason": reason}
            )
            == count
        ), reason
    kernel = {**labels, "reason": "kernel"}
    assert registry.get_sample_value("udpbindd_dropped_packets_total", kernel) == 99


def test_rate_limit_evictions_are_exported_per_binding() -> None:
    stats = Stats()
    stats.rate_limit_evictions = 7
    registry = make_registry(lambda: Snapshot(bound=[bound("x", "127.0.0.1", 1060, stats=stats)]))
    labels = {"listener": "x", "socket": "127.0.0.1:1060"}
    assert registry.get_sample_value("udpbindd_rate_limit_evictions_total", labels) == 7


def test_an_unreadable_kernel_count_is_left_out_not_reported_as_zero() -> None:
    registry = make_registry(lambda: Snapshot(bound=[bound("x", "::1", 9, drops=None)]))
    labels = {"listener": "x", "socket": "[::1]:9"}
    dropped = "udpbindd_dropped_packets_total"
    assert registry.get_sample_value(dropped, {**labels, "reason": "kernel"}) is None
    assert registry.get_sample_value(dropped, {**labels, "reason": "simulated"}) == 0
    assert registry.get_sample_value("udpbindd_received_packets_total", labels) == 0


def test_a_listener_that_is_down_is_up_zero_and_has_no_other_series() -> None:
    snap = Snapshot(
        bound=[bound("ok", "127.0.0.1", 1060)],
        down=[Down("broken", "192.0.2.1:1060"), Down("gone", "eth9 port 53")],
    )
    found = samples(exposition(make_registry(lambda: snap)))
    assert value(found, "udpbindd_listener_up", listener="ok", socket="127.0.0.1:1060") == 1
    assert value(found, "udpbindd_listener_up", listener="broken", socket="192.0.2.1:1060") == 0
    assert value(found, "udpbindd_listener_up", listener="gone", socket="eth9 port 53") == 0
    for name in PER_BINDING:
        if name != "udpbindd_listener_up":
            assert {s["listener"] for s in series(found, name)} == {"ok"}, name


def test_a_repeated_down_socket_is_one_series() -> None:
    snap = Snapshot(
        bound=[bound("ok", "127.0.0.1", 1060)],
        down=[Down("a", "10.0.0.1:53"), Down("a", "10.0.0.1:53"), Down("ok", "127.0.0.1:1060")],
    )
    # samples() fails on a duplicate series: Prometheus would reject such a scrape.
    found = samples(exposition(make_registry(lambda: snap)))
    assert value(found, "udpbindd_listener_up", listener="a", socket="10.0.0.1:53") == 0
    assert value(found, "udpbindd_listener_up", listener="ok", socket="127.0.0.1:1060") == 1


def test_bindings_that_go_away_drop_out() -> None:
    one, two = bound("one", "127.0.0.1", 1060), bound("two", "::1", 1061)
    current = [one, two]
    registry = make_registry(lambda: Snapshot(bound=list(current)))
    before = samples(exposition(registry))
    for name in PER_BINDING:
        assert {s["listener"] for s in series(before, name)} == {"one", "two"}, name
    current.remove(two)
    after = samples(exposition(registry))
    for name in (*PER_BINDING, "udpbindd_dropped_packets_total"):
        assert {s["listener"] for s in series(after, name)} == {"one"}, name
    assert "two" not in exposition(registry)


def test_reload_gauges_report_a_failed_reload() -> None:
    snap = Snapshot(reload_ok=False, reload_timestamp=1234.5)
    registry = make_registry(lambda: snap)
    assert registry.get_sample_value("udpbindd_config_last_reload_successful") == 0
    assert registry.get_sample_value(
        "udpbindd_config_last_reload_success_timestamp_seconds"
    ) == pytest.approx(1234.5)


def test_registering_takes_no_snapshot() -> None:
    calls: list[int] = []

    def snapshot() -> Snapshot:
        calls.append(1)
        return Snapshot()

    registry = make_registry(snapshot)
    assert calls == []
    exposition(registry)
    assert calls == [1]


def test_a_name_filter_finds_udpbindd_series() -> None:
    registry = make_registry(golden_snapshot)
    restricted = registry.restricted_registry(["udpbindd_listener_up", "process_open_fds"])
    found = samples(generate_latest(restricted).decode())
    assert {name for name, _ in found} == {"udpbindd_listener_up", "process_open_fds"}
    assert len(series(found, "udpbindd_listener_up")) == 4


# -- in-process daemon: real sockets, real reloads -------------------------------------------------


def test_daemon_state_through_start_and_reload(log_events: list[dict[str, object]]) -> None:
    p4, p6 = free_port_both(), free_port_both()
    first = f"""
listeners:
  - {{name: four, interface: 127.0.0.1, port: {p4}, recv_buffer: 64KiB}}
  - {{name: six, interface: '::1', port: {p6}, responder: echo}}
"""
    second = (
        f"listeners:\n  - {{name: four, interface: 127.0.0.1, port: {p4}, recv_buffer: 64KiB}}\n"
    )
    texts = iter([second, "listeners: 5\n"])
    cfg = parse_text(first, "first.yaml")
    daemon = Daemon(cfg, loader=lambda: parse_text(next(texts), "reload.yaml"))
    try:
        started = time.time()
        daemon.start(survey(cfg.enabled_listeners))
        registry = make_registry(daemon.snapshot)
        get_value = registry.get_sample_value
        four = {"listener": "four", "socket": f"127.0.0.1:{p4}"}
        six = {"listener": "six", "socket": f"[::1]:{p6}"}
        assert get_value("udpbindd_listener_up", four) == 1
        assert get_value("udpbindd_listener_up", six) == 1
        sock = daemon.served[SocketName(ipaddress.ip_address("127.0.0.1"), p4)].sock
        # Granted, not requested: the kernel doubles a request for its bookkeeping.
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert granted == 2 * 64 * 1024
        assert get_value("udpbindd_receive_buffer_bytes", four) == granted
        info = {"address": "::1", "port": str(p6), "family": "ipv6", "device": ""}
        assert get_value("udpbindd_listener_info", {**six, **info, "responder": "echo"}) == 1
        assert get_value("udpbindd_config_last_reload_successful") == 1
        stamp = get_value("udpbindd_config_last_reload_success_timestamp_seconds")
        assert stamp is not None
        assert started <= stamp <= time.time()

        before = daemon.snapshot()
        daemon.reload()  # "six" removed
        assert get_value("udpbindd_listener_up", four) == 1
        # A scrape that took its snapshot just before the reload reads a closed socket.
        late = make_registry(lambda: before)
        dropped = "udpbindd_dropped_packets_total"
        assert late.get_sample_value(dropped, {**six, "reason": "kernel"}) is None
        assert late.get_sample_value(dropped, {**four, "reason": "kernel"}) == 0
        assert late.get_sample_value("udpbindd_received_packets_total", six) == 0
        found = samples(exposition(registry))
        for name in (*PER_BINDING, "udpbindd_dropped_packets_total"):
            assert {s["listener"] for s in series(found, name)} == {"four"}, name
        assert get_value("udpbindd_config_last_reload_successful") == 1
        reloaded = get_value("udpbindd_config_last_reload_success_timestamp_seconds")
        assert reloaded is not None
        assert reloaded >= stamp

        daemon.reload()  # an invalid file: the state stays, the gauge says so
        assert get_value("udpbindd_config_last_reload_successful") == 0
        assert get_value("udpbindd_config_last_reload_success_timestamp_seconds") == reloaded
        assert get_value("udpbindd_listener_up", four) == 1
    finally:
        daemon.shutdown()
    with pytest.raises(ConfigError):
        parse_text("listeners: 5\n", "reload.yaml")


# -- the HTTP(S) server in-process -----------------------------------------------------------------


@contextlib.contextmanager
def metrics_server(
    endpoints: Sequence[Endpoint], tls: MetricsTLS | None = None
) -> Iterator[MetricsServer]:
    server = MetricsServer(make_registry(golden_snapshot))
    server.start(endpoints, tls)
    try:
        yield server
    finally:
        server.stop()


def listening(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, port)) == 0


def test_server_serves_ipv4_and_ipv6_loopback() -> None:
    with metrics_server([Endpoint("127.0.0.1", 0), Endpoint("::1", 0)]) as server:
        (host4, port4), (host6, port6) = server.addresses
        assert (host4, host6) == ("127.0.0.1", "::1")
        for host, port in server.addresses:
            found = samples(scrape(host, port))
            assert value(found, "udpbindd_listener_up", listener="dns", socket="127.0.0.1:1060")
    assert not listening("127.0.0.1", port4)
    assert not listening("::1", port6)


def test_the_two_wildcards_can_share_a_port() -> None:
    # IPV6_V6ONLY is set explicitly, so "[::]:P" never takes the IPv4 side of "0.0.0.0:P".
    port = free_tcp_port()
    with metrics_server([Endpoint("0.0.0.0", port), Endpoint("::", port)]) as server:
        assert [p for _, p in server.addresses] == [port, port]
        assert "udpbindd_build_info" in scrape("127.0.0.1", port)
        assert "udpbindd_build_info" in scrape("::1", port)


def test_a_name_filter_over_http() -> None:
    with metrics_server([Endpoint("127.0.0.1", 0)]) as server:
        host, port = server.addresses[0]
        found = samples(scrape(host, port, path="/metrics?name[]=udpbindd_received_bytes_total"))
    assert {name for name, _ in found} == {"udpbindd_received_bytes_total"}


def test_an_empty_listen_list_serves_nothing_and_reads_no_tls_file() -> None:
    server = MetricsServer(make_registry(golden_snapshot))
    server.start((), MetricsTLS("/nonexistent/cert.pem", "/nonexistent/key.pem"))
    assert server.addresses == []
    server.stop()


def test_an_address_in_use_fails_and_closes_what_was_opened() -> None:
    first = free_tcp_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        server = MetricsServer(make_registry(golden_snapshot))
        with pytest.raises(MetricsError) as caught:
            server.start([Endpoint("127.0.0.1", first), Endpoint("127.0.0.1", taken)])
        assert str(caught.value) == (
            f"cannot serve metrics on 127.0.0.1:{taken}: Address already in use"
        )
        assert server.addresses == []
        assert not listening("127.0.0.1", first)


def test_a_silent_client_does_not_hold_up_other_scrapes() -> None:
    with metrics_server([Endpoint("127.0.0.1", 0)]) as server:
        host, port = server.addresses[0]
        with socket.create_connection((host, port), timeout=5):
            assert "udpbindd_listener_up" in scrape(host, port, timeout=5)


# -- TLS -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A throwaway CA with a server and a client certificate, and a client of another CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(
        [require_tool("openssl"), *args], cwd=directory, check=True, capture_output=True, timeout=60
    )


def _ca(directory: Path, name: str) -> None:
    _openssl(
        directory, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
        "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip


def _leaf(directory: Path, name: str, ca: str, serial: int, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        directory, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        directory, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
        f"{ca}.key", "-set_serial", str(serial), "-days", "2", "-out", f"{name}.pem",
        "-extfile", f"{name}.ext",
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    _ca(directory, "ca")
    _ca(directory, "other-ca")
    leaf = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
    _leaf(
        directory, "server", "ca", 1,
        f"{leaf}extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n",
    )  # fmt: skip
    _leaf(directory, "client", "ca", 2, f"{leaf}extendedKeyUsage=clientAuth\n")
    _leaf(directory, "stranger", "other-ca", 3, f"{leaf}extendedKeyUsage=clientAuth\n")
    d = directory
    return Pki(
        d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
        d / "stranger.pem", d / "stranger.key",
    )  # fmt: skip


def client_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def refused(host: str, port: int, context: ssl.SSLContext | None) -> bool:
    """Whether a scrape fails before any metrics arrive (TLS alert, reset, or garbage)."""
    try:
        status, body = get(host, port, "/metrics", context=context)
    except (OSError, http.client.HTTPException):
        return True
    assert b"udpbindd_" not in body, f"metrics were served (HTTP {status})"
    return False


def test_https_with_the_ca(pki: Pki) -> None:
    tls = MetricsTLS(str(pki.server_cert), str(pki.server_key))
    with metrics_server([Endpoint("127.0.0.1", 0), Endpoint("::1", 0)], tls) as server:
        for host, port in server.addresses:
            found = samples(scrape(host, port, context=client_context(pki)))
            assert value(found, "udpbindd_build_info", version=__version__) == 1
            assert refused(host, port, None), "plain HTTP was answered"
            # A client that does not trust this CA refuses the server.
            assert refused(host, port, ssl.create_default_context())
        # Still serving after the failed attempts.
        assert "udpbindd_listener_up" in scrape(*server.addresses[0], context=client_context(pki))


def test_mutual_tls_requires_a_client_certificate_from_the_ca(pki: Pki) -> None:
    tls = MetricsTLS(str(pki.server_cert), str(pki.server_key), str(pki.ca))
    with metrics_server([Endpoint("127.0.0.1", 0)], tls) as server:
        host, port = server.addresses[0]
        assert refused(host, port, client_context(pki)), "served without a client certificate"
        stranger = client_context(pki, pki.stranger_cert, pki.stranger_key)
        assert refused(host, port, stranger), "served to a certificate of another CA"
        assert refused(host, port, None), "plain HTTP was answered"
        with_cert = client_context(pki, pki.client_cert, pki.client_key)
        found = samples(scrape(host, port, context=with_cert))
        assert value(found, "udpbindd_listener_up", listener="dns6", socket="[::1]:1060") == 1


def test_a_stalled_tls_handshake_does_not_hold_up_other_scrapes(pki: Pki) -> None:
    tls = MetricsTLS(str(pki.server_cert), str(pki.server_key))
    with metrics_server([Endpoint("127.0.0.1", 0)], tls) as server:
        host, port = server.addresses[0]
        with socket.create_connection((host, port), timeout=5):
            assert "udpbindd_" in scrape(host, port, context=client_context(pki), timeout=5)


def test_tls_files_that_cannot_be_used_are_a_metrics_error(pki: Pki, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    cert, key = str(pki.server_cert), str(pki.server_key)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    for tls, named in (
        (MetricsTLS(missing, key), f"cert {missing}, key {key}: "),
        (MetricsTLS(cert, missing), f"cert {cert}, key {missing}: "),
        # a key that does not match the certificate
        (MetricsTLS(cert, str(pki.client_key)), f"cert {cert}, key {pki.client_key}: "),
        (MetricsTLS(cert, key, missing), f"client_ca {missing}: "),
        (MetricsTLS(cert, key, str(garbage)), f"client_ca {garbage}: "),
    ):
        with pytest.raises(MetricsError) as caught:
            tls_context(tls)
        assert str(caught.value).startswith(f"cannot load the metrics TLS files: {named}")
    server = MetricsServer(make_registry(golden_snapshot))
    with pytest.raises(MetricsError):
        server.start([Endpoint("127.0.0.1", 0)], MetricsTLS(cert, missing))
    assert server.addresses == []


# -- a real daemon ---------------------------------------------------------------------------------


@contextlib.contextmanager
def daemon(
    write_config: WriteConfig, text: str, env: dict[str, str] | None = None
) -> Iterator[DaemonProcess]:
    """``udpbindd run`` on ``text`` (JSON logs), once it has logged ``started``."""
    with DaemonProcess(write_config(text + "logging: {format: json}\n"), env=env) as proc:
        proc.wait_for_event("started")
        yield proc


def wait_scraped(
    port: int, expected: dict[tuple[str, tuple[tuple[str, str], ...]], float]
) -> Samples:
    """Scrape until every expected series has its value (bounded); return the last scrape."""

    def matches(found: Samples) -> bool:
        return all(
            value(found, name, **dict(labels)) == want for (name, labels), want in expected.items()
        )

    found: Samples = wait_for(
        lambda: samples(scrape("127.0.0.1", port)), matches, "the expected counters", DEADLINE
    )
    return found


def size_reply(n: int) -> bytes:
    return b"Your data was %d bytes" % n


def socket_label(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def receive_buffer_from_ss(port: int) -> int:
    """The receive buffer the kernel reports for the UDP socket on ``port`` (ss -m: rb)."""
    ss = require_tool("ss")
    out = subprocess.run(
        [ss, "-u", "-a", "-n", "-m", "-H", f"sport = :{port}"],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout  # fmt: skip
    marks = [part for part in out.replace("(", ",").replace(")", ",").split(",") if part]
    buffers = [int(mark[2:]) for mark in marks if mark.startswith("rb") and mark[2:].isdigit()]
    assert len(buffers) == 1, out
    return buffers[0]


def test_scraped_counters_equal_what_was_sent_and_replied(write_config: WriteConfig) -> None:
    ports = [free_port_both() for _ in range(5)]
    metrics_port = free_tcp_port()
    plan = {
        # name: (host, port, responder, drop_rate, payload sizes)
        "v4-size": ("127.0.0.1", ports[0], "size", 0.0, [0, 1, 10, 100, 1000, 1472, 9000]),
        "v4-echo": ("127.0.0.1", ports[1], "echo", 0.0, [1, 2, 3, 65507]),
        "v6-echo": ("::1", ports[2], "echo", 0.0, [7, 1232, 40000]),
        "v6-discard": ("::1", ports[3], "discard", 0.0, [5] * 11),
        "v4-lossy": ("127.0.0.1", ports[4], "size", 1.0, [64] * 6),
    }
    lines = "".join(
        f"  - {{name: {name}, interface: '{host}', port: {port}, responder: {responder},"
        f" drop_rate: {rate}}}\n"
        for name, (host, port, responder, rate, _) in plan.items()
    )
    text = f'listeners:\n{lines}metrics:\n  listen: ["127.0.0.1:{metrics_port}"]\n'
    with daemon(write_config, text):
        expected: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for name, (host, port, responder, rate, sizes) in plan.items():
            replies = []
            for size in sizes:
                payload = bytes(i % 251 for i in range(size))
                answers = responder != "discard" and rate == 0
                reply = exchange(host, port, payload, timeout=5.0 if answers else 0.05)
                if answers:
                    assert reply == (size_reply(size) if responder == "size" else payload)
                    replies.append(reply)
                else:
                    assert reply is None
            labels = (("listener", name), ("socket", socket_label(host, port)))
            expected[("udpbindd_received_packets_total", labels)] = len(sizes)
            expected[("udpbindd_received_bytes_total", labels)] = sum(sizes)
            expected[("udpbindd_sent_packets_total", labels)] = len(replies)
            expected[("udpbindd_sent_bytes_total", labels)] = sum(len(r) for r in replies)
            for reason in DROP_REASONS:
                dropped = len(sizes) if (reason == "simulated" and rate) else 0
                expected[("udpbindd_dropped_packets_total", (*labels, ("reason", reason)))] = (
                    dropped
                )
            expected[("udpbindd_listener_up", labels)] = 1
            family = "ipv6" if ":" in host else "ipv4"
            info = (("address", host), ("port", str(port)), ("family", family), ("device", ""))
            expected[("udpbindd_listener_info", (*labels, *info, ("responder", responder)))] = 1
        found = wait_scraped(metrics_port, expected)
        actual = {key: value(found, key[0], **dict(key[1])) for key in expected}
        assert actual == expected
        sockets = {socket_label(host, port) for host, port, *_ in plan.values()}
        assert {s["socket"] for s in series(found, "udpbindd_listener_up")} == sockets
        for name, (host, port, *_) in plan.items():
            granted = value(
                found,
                "udpbindd_receive_buffer_bytes",
                listener=name,
                socket=socket_label(host, port),
            )
            assert granted == receive_buffer_from_ss(port)


def udp_sockets_on(port: int, family: int) -> list[tuple[int, int]]:
    """(inode, drops) of every UDP socket bound to ``port``, from /proc/net/udp or udp6."""
    table = Path("/proc/net/udp" if family == 4 else "/proc/net/udp6").read_text()
    rows = []
    for line in table.splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            rows.append((int(fields[9]), int(fields[12])))
    return rows


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def process_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP, every thread) until the block ends (SIGCONT)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: process_state(pid), lambda state: state == "T", "SIGSTOP", DEADLINE, 0.01)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("family", [4, 6])
def test_kernel_drops_equal_the_kernels_own_count(write_config: WriteConfig, family: int) -> None:
    host = "127.0.0.1" if family == 4 else "::1"
    port, metrics_port, sent = free_port_both(), free_tcp_port(), 300
    text = (
        f"listeners:\n  - {{name: tiny, interface: '{host}', port: {port}, responder: discard,"
        f" recv_buffer: 4KiB}}\n"
        f'metrics:\n  listen: ["127.0.0.1:{metrics_port}"]\n'
    )
    labels = {"listener": "tiny", "socket": socket_label(host, port)}
    with daemon(write_config, text) as proc:
        [(inode, drops_before)] = udp_sockets_on(port, family)
        assert inode in socket_inodes(proc.pid)
        assert drops_before == 0
        family_id = socket.AF_INET6 if family == 6 else socket.AF_INET
        with paused(proc.pid), socket.socket(family_id, socket.SOCK_DGRAM) as client:
            for _ in range(sent):
                client.sendto(b"x" * 200, (host, port))
            [(_, drops_paused)] = udp_sockets_on(port, family)
        # The loop was frozen, so the small queue overflowed: the test has something to count.
        assert 0 < drops_paused < sent

        def settled(found: Samples) -> bool:
            received = value(found, "udpbindd_received_packets_total", **labels) or 0
            kernel = value(found, "udpbindd_dropped_packets_total", **labels, reason="kernel")
            return received + (kernel or 0) == sent

        found = wait_for(
            lambda: samples(scrape("127.0.0.1", metrics_port)),
            settled,
            "received + dropped",
            DEADLINE,
        )
        [(_, drops_now)] = udp_sockets_on(port, family)
        kernel = value(found, "udpbindd_dropped_packets_total", **labels, reason="kernel")
        received = value(found, "udpbindd_received_packets_total", **labels)
        assert kernel == drops_now == drops_paused
        assert received == sent - drops_now
        granted = value(found, "udpbindd_receive_buffer_bytes", **labels)
        assert granted == receive_buffer_from_ss(port)

        # A re-bind (recv_buffer changed) moves the name to a new socket, with a kernel count
        # of its own: the exported count must carry on from the old one, never go back.
        assert proc.config is not None
        proc.config.write_text(text.replace("recv_buffer: 4KiB", "recv_buffer: 8KiB"))
        proc.signal(signal.SIGHUP)
        assert proc.wait_for_event("reload_finished")["rebound"] == 1
        [(new_inode, new_drops)] = udp_sockets_on(port, family)
        assert (new_inode != inode, new_drops) == (True, 0)
        after = samples(scrape("127.0.0.1", metrics_port))
        assert value(after, "udpbindd_dropped_packets_total", **labels, reason="kernel") == kernel


def test_the_live_endpoint_passes_promtool_lint(write_config: WriteConfig) -> None:
    port, metrics_port = free_port_both(), free_tcp_port()
    text = (
        f"listeners:\n  - {{name: a, interface: 127.0.0.1, port: {port}}}\n"
        f"  - {{name: b, interface: '::1', port: {port}, responder: echo}}\n"
        f'metrics:\n  listen: ["127.0.0.1:{metrics_port}"]\n'
    )
    with daemon(write_config, text):
        assert exchange("127.0.0.1", port, b"hello") == size_reply(5)
        live = scrape("127.0.0.1", metrics_port)
    assert "udpbindd_received_packets_total{" in live
    assert "process_cpu_seconds_total" in live
    result = promtool_check(live)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_metrics_answer_by_the_time_ready_is_sent(write_config: WriteConfig) -> None:
    port, metrics_port = free_port_both(), free_tcp_port()
    text = (
        f"listeners:\n  - {{name: a, interface: 127.0.0.1, port: {port}}}\n"
        f'metrics:\n  listen: ["127.0.0.1:{metrics_port}"]\n'
    )
    name = f"udpbindd-test-metrics-{os.getpid()}-{metrics_port}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind("\0" + name)
        notify.settimeout(DEADLINE)
        with DaemonProcess(write_config(text), env={"NOTIFY_SOCKET": "@" + name}) as proc:
            end = time.monotonic() + DEADLINE
            while b"READY=1" not in notify.recv(4096).split(b"\n"):
                assert time.monotonic() < end, "no READY=1"
            # One attempt, no retry: by READY=1 the endpoint must already answer.
            found = samples(scrape("127.0.0.1", metrics_port))
            assert value(found, "udpbindd_listener_up", listener="a", socket=f"127.0.0.1:{port}")
            assert proc.stop() == 0


def test_the_daemon_serves_metrics_over_mutual_tls(write_config: WriteConfig, pki: Pki) -> None:
    port, metrics_port = free_port_both(), free_tcp_port()
    text = (
        f"listeners:\n  - {{name: a, interface: 127.0.0.1, port: {port}}}\n"
        f'metrics:\n  listen: ["127.0.0.1:{metrics_port}"]\n'
        f"  tls: {{cert: {pki.server_cert}, key: {pki.server_key}, client_ca: {pki.ca}}}\n"
    )
    with daemon(write_config, text):
        with_cert = client_context(pki, pki.client_cert, pki.client_key)
        found = samples(scrape("127.0.0.1", metrics_port, context=with_cert))
        assert value(found, "udpbindd_listener_up", listener="a", socket=f"127.0.0.1:{port}") == 1
        assert refused("127.0.0.1", metrics_port, client_context(pki))
        assert refused("127.0.0.1", metrics_port, None)


def test_a_missing_tls_file_stops_the_daemon_with_a_clear_message(
    write_config: WriteConfig, pki: Pki, tmp_path: Path
) -> None:
    port, metrics_port = free_port_both(), free_tcp_port()
    missing = tmp_path / "missing.key"
    text = (
        f"listeners:\n  - {{name: a, interface: 127.0.0.1, port: {port}}}\n"
        f'metrics:\n  listen: ["127.0.0.1:{metrics_port}"]\n'
        f"  tls: {{cert: {pki.server_cert}, key: {missing}}}\n"
        "logging: {format: json}\n"
    )
    with DaemonProcess(write_config(text)) as proc:
        assert proc.wait() == 1
    stderr = proc.stderr.decode()
    assert "Traceback" not in stderr
    assert plain_lines(proc.stderr) == [
        f"udpbindd: cannot load the metrics TLS files: cert {pki.server_cert}, key {missing}:"
        " [Errno 2] No such file or directory"
    ]
    assert not listening("127.0.0.1", metrics_port)
