"""Prometheus for the tests: scrape udpbindd's /metrics, and run one real Prometheus server.

``scrape``/``samples`` read an exposition over HTTP(S) into ``{(name, labels): value}``.
``prometheus_server`` is a session fixture: ONE ``prometheus`` process on loopback, 1 s scrape
interval, a TSDB in a temporary directory, scraping the job ``udpbindd`` at two fixed
addresses (``127.0.0.1:P4`` and ``[::1]:P6``) that tests give their daemon as
``metrics.listen``. It is killed by pid when the session ends. Every wait here is bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from conftest import require_tool
from prometheus_client.parser import text_string_to_metric_families

# The first scrape comes ~5-6 s after Prometheus starts (a fixed 5 s target sync in 2.42).
READY_DEADLINE = 30.0
QUERY_DEADLINE = 40.0

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the kernel picked it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def scrape(
    host: str,
    port: int,
    *,
    path: str = "/metrics",
    context: ssl.SSLContext | None = None,
    timeout: float = 5.0,
) -> str:
    """GET ``path`` from udpbindd's endpoint and return the body (HTTPS with ``context``)."""
    status, body = get(host, port, path, context=context, timeout=timeout)
    assert status == 200, f"GET {path}: HTTP {status}: {body[:200]!r}"
    return body.decode()


def get(
    host: str,
    port: int,
    path: str,
    *,
    context: ssl.SSLContext | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    """One GET over a fresh connection (never through a proxy); the status and the body."""
    conn = (
        http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        if context is not None
        else http.client.HTTPConnection(host, port, timeout=timeout)
    )
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def samples(text: str) -> Samples:
    """Every sample of an exposition, keyed by name and label set."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in found, f"duplicate series {key}"
            found[key] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float | None:
    """The value of one series, or None when it is absent."""
    return found.get((name, frozenset(labels.items())))


def series(found: Samples, name: str) -> list[dict[str, str]]:
    """The label sets of every series named ``name``."""
    return [dict(labels) for sample_name, labels in found if sample_name == name]


def wait_for(
    produce: Callable[[], Any],
    done: Callable[[Any], bool],
    what: str,
    deadline: float,
    pause: float = 0.1,
) -> Any:
    """Call ``produce`` until ``done`` accepts its result; fail showing the last one."""
    end = time.monotonic() + deadline
    last: Any = None
    while True:
        # Not up yet, or restarting: a refused or cut connection is worth another try.
        with contextlib.suppress(OSError, http.client.HTTPException):
            last = produce()
            if done(last):
                return last
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline} s waiting for {what}; last: {last}")
        time.sleep(pause)


@dataclass
class PrometheusServer:
    """A running Prometheus: its API address and the udpbindd targets it scrapes."""

    port: int
    target4: tuple[str, int]
    target6: tuple[str, int]
    log: Path

    @property
    def instances(self) -> tuple[str, str]:
        """The ``instance`` label of each target, as Prometheus writes it."""
        return (
            f"{self.target4[0]}:{self.target4[1]}",
            f"[{self.target6[0]}]:{self.target6[1]}",
        )

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query: the result vector as [{"metric": {...}, "value": [t, "v"]}]."""
        status, raw = get("127.0.0.1", self.port, f"/api/v1/query?{urlencode({'query': promql})}")
        body = json.loads(raw)
        assert status == 200, body
        assert body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", body
        return list(body["data"]["result"])

    def values(self, promql: str, *by: str) -> dict[tuple[str, ...], float]:
        """An instant query's samples keyed by the values of labels ``by``."""
        return {
            tuple(item["metric"].get(label, "") for label in by): float(item["value"][1])
            for item in self.query(promql)
        }

    def wait_values(
        self, promql: str, by: tuple[str, ...], expected: dict[tuple[str, ...], float]
    ) -> None:
        """Poll until ``promql`` yields exactly ``expected`` (bounded by QUERY_DEADLINE)."""
        wait_for(
            lambda: self.values(promql, *by),
            lambda got: got == expected,
            f"{promql} == {expected}",
            QUERY_DEADLINE,
            pause=0.25,
        )


def _ready(port: int) -> bool:
    try:
        return get("127.0.0.1", port, "/-/ready", timeout=1)[0] == 200
    except (OSError, http.client.HTTPException):
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM by pid, then SIGKILL by pid if it does not exit in time."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def prometheus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """One real Prometheus for the whole session, scraping job ``udpbindd`` every second."""
    binary = require_tool("prometheus")
    base = tmp_path_factory.mktemp("prometheus")
    target4 = ("127.0.0.1", free_tcp_port("127.0.0.1"))
    target6 = ("::1", free_tcp_port("::1"))
    web_port = free_tcp_port()
    config = base / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: udpbindd\n"
        "    static_configs:\n"
        f'      - targets: ["{target4[0]}:{target4[1]}", "[{target6[0]}]:{target6[1]}"]\n'
    )
    log = base / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={base / 'data'}",
                f"--web.listen-address=127.0.0.1:{web_port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        end = time.monotonic() + READY_DEADLINE
        while not _ready(web_port):
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"prometheus did not become ready:\n{log.read_text()}")
            time.sleep(0.1)
        yield PrometheusServer(web_port, target4, target6, log)
    finally:
        _stop(proc)
