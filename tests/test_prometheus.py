"""A real Prometheus scrapes a real ``udpbindd run``: what an operator's Prometheus would store.

One Prometheus runs for the whole session (``prometheus.prometheus_server``) and scrapes the
job ``udpbindd`` at ``127.0.0.1:P4`` and ``[::1]:P6``; each test starts a daemon whose
``metrics.listen`` names some, all or none of those addresses. Listener names carry the test's
port, so no test can be satisfied by series another test left behind.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from conftest import free_port_both
from daemonproc import exchange
from prometheus import PrometheusServer, prometheus_server, samples, scrape, value
from test_metrics import daemon, size_reply, socket_inodes

from udpbindd.metrics import DROP_REASONS

WriteConfig = Callable[[str], Path]
__all__ = ["prometheus_server"]  # the session fixture, imported so pytest finds it here


def listening_tcp(inodes: set[int]) -> list[str]:
    """The TCP sockets among ``inodes`` that listen, as /proc/net/tcp{,6} rows."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[9]) in inodes:  # 0A: TCP_LISTEN
                rows.append(line)
    return rows


def udp_inodes() -> set[int]:
    inodes = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            inodes.add(int(line.split()[9]))
    return inodes


def test_prometheus_scrapes_per_binding_counters_from_two_addresses(
    prometheus_server: PrometheusServer, write_config: WriteConfig
) -> None:
    prom = prometheus_server
    (host4, port4), (host6, port6) = prom.target4, prom.target6
    inst4, inst6 = prom.instances
    port = free_port_both()
    v4, v6 = f"t{port}-v4", f"t{port}-v6"
    sock4, sock6 = f"127.0.0.1:{port}", f"[::1]:{port}"
    text = (
        f"listeners:\n  - {{name: {v4}, interface: 127.0.0.1, port: {port}, responder: size}}\n"
        f"  - {{name: {v6}, interface: '::1', port: {port}, responder: echo}}\n"
        f'metrics:\n  listen: ["{host4}:{port4}", "[{host6}]:{port6}"]\n'
    )
    with daemon(write_config, text):
        for _ in range(5):
            assert exchange("127.0.0.1", port, b"x" * 100, timeout=5) == size_reply(100)
        for _ in range(3):
            assert exchange("::1", port, b"y" * 1000, timeout=5) == b"y" * 1000

        # Both addresses serve the same exposition.
        for host, metrics_port in prom.target4, prom.target6:
            found = samples(scrape(host, metrics_port))
            assert value(found, "udpbindd_received_packets_total", listener=v4, socket=sock4) == 5
            assert value(found, "udpbindd_received_packets_total", listener=v6, socket=sock6) == 3

        prom.wait_values('up{job="udpbindd"} == 1', ("instance",), {(inst4,): 1, (inst6,): 1})
        mine = f'{{job="udpbindd", listener=~"t{port}-.*"}}'
        expected = {
            "udpbindd_received_packets_total": {sock4: 5, sock6: 3},
            "udpbindd_received_bytes_total": {sock4: 500, sock6: 3000},
            "udpbindd_sent_packets_total": {sock4: 5, sock6: 3},
            "udpbindd_sent_bytes_total": {sock4: 5 * len(size_reply(100)), sock6: 3000},
        }
        for metric, per_socket in expected.items():
            prom.wait_values(
                metric + mine,
                ("instance", "listener", "socket"),
                {
                    (instance, v4 if sock == sock4 else v6, sock): count
                    for instance in (inst4, inst6)
                    for sock, count in per_socket.items()
                },
            )
        prom.wait_values(
            f"udpbindd_dropped_packets_total{mine}",
            ("instance", "socket", "reason"),
            {
                (instance, sock, reason): 0
                for instance in (inst4, inst6)
                for sock in (sock4, sock6)
                for reason in DROP_REASONS
            },
        )


def test_an_ipv6_address_alone_serves_and_only_it(
    prometheus_server: PrometheusServer, write_config: WriteConfig
) -> None:
    prom = prometheus_server
    host6, port6 = prom.target6
    inst4, inst6 = prom.instances
    port = free_port_both()
    name = f"t{port}-only6"
    text = (
        f"listeners:\n  - {{name: {name}, interface: '::1', port: {port}}}\n"
        f'metrics:\n  listen: ["[{host6}]:{port6}"]\n'
    )
    with daemon(write_config, text) as proc:
        assert exchange("::1", port, b"abc", timeout=5) == size_reply(3)
        prom.wait_values(
            f'udpbindd_received_packets_total{{listener="{name}"}}',
            ("instance", "socket"),
            {(inst6, f"[::1]:{port}"): 1},
        )
        prom.wait_values('up{job="udpbindd"}', ("instance",), {(inst4,): 0, (inst6,): 1})
        [listen] = listening_tcp(socket_inodes(proc.pid))
        assert listen.split()[1].upper().endswith(f":{port6:04X}")


def test_an_empty_listen_list_disables_the_endpoint(
    prometheus_server: PrometheusServer, write_config: WriteConfig
) -> None:
    prom = prometheus_server
    port = free_port_both()
    text = (
        f"listeners:\n  - {{name: t{port}-quiet, interface: 127.0.0.1, port: {port}}}\n"
        "metrics:\n  listen: []\n"
    )
    with daemon(write_config, text) as proc:
        assert exchange("127.0.0.1", port, b"hi", timeout=5) == size_reply(2)
        inodes = socket_inodes(proc.pid)
        # The inode lookup works (the UDP listener is found), and no TCP socket listens.
        assert inodes & udp_inodes()
        assert listening_tcp(inodes) == []
        prom.wait_values('up{job="udpbindd"}', ("instance",), {(i,): 0 for i in prom.instances})
        assert prom.query(f'{{listener="t{port}-quiet"}}') == []
