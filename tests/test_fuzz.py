"""Property-based tests of the two ways hostile input reaches udpbindd: datagrams and files.

Datagrams: random payloads (empty to 65,507 bytes, random bytes, bursts) from a set of client
sockets, some from well-known ports and refused addresses, through a real daemon whose
listeners cover every drop reason and both receive paths. Every datagram sent is received or
dropped by the kernel; every one received is answered or counted under exactly one reason;
every reply is a right answer, from the address its request was sent to.

Files: random text and random YAML trees into ``config.parse_text`` never raise anything but
``ConfigError``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import structlog
import yaml
from conftest import free_port_both, io_path
from hypothesis import given, settings
from hypothesis import strategies as st
from test_daemon import running, started, wait_until

from udpbindd import config as config_module
from udpbindd.config import ConfigError, IOMode, parse_text
from udpbindd.daemon import Daemon
from udpbindd.sockets import set_receive_buffer

# More examples on request (FUZZ_EXAMPLES=2000) for a long local run; CI runs the default.
# Each datagram example is a real exchange; a configuration example costs far less.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
CONFIG_EXAMPLES = 3 * EXAMPLES
DEADLINE = 15.0
LARGEST = 65507  # the largest UDP payload over IPv4 (IPv6 allows 65,527)
CLIENT_BUFFER = 8 * 1024 * 1024


@dataclass
class Target:
    """One address a client may send to, and what the listener behind it answers."""

    host: str
    port: int
    echo: bool
    label: str  # the socket name of the binding that receives it


@dataclass
class Client:
    sock: socket.socket
    name: str
    sent: Counter[tuple[int, bytes]] = field(default_factory=Counter)


@dataclass
class Rig:
    daemon: Daemon
    targets: list[Target]
    clients: list[Client]


def _client(family: int, host: str, port: int = 0) -> socket.socket | None:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if error.errno in (errno.EACCES, errno.EADDRINUSE):
            return None  # a well-known port needs root, and must be free
        raise
    set_receive_buffer(sock, CLIENT_BUFFER)
    sock.setblocking(False)
    return sock


@pytest.fixture(scope="module", params=list(IOMode), ids=lambda mode: f"io={mode}")
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    """The daemon every example talks to, once on each path (batched, plain)."""
    ports = [free_port_both() for _ in range(5)]
    size, echo, guarded, star, six = ports
    text = f"""
listeners:
  - {{name: size, interface: 127.0.0.1, port: {size}}}
  - name: echo
    interface: 127.0.0.1
    port: {echo}
    responder: echo
    rate_limit: {{packets_per_second: 200, burst: 20}}
  - name: guarded
    interface: 127.0.0.1
    port: {guarded}
    drop_rate: 0.3
    allow: [127.0.0.0/30]
    deny: [127.0.0.2]
    reflection_guard: {{max_amplification: 1.0}}
  - {{name: star, interface: "*", port: {star}, responder: echo, deny: [127.0.0.3]}}
  - {{name: six, interface: "::1", port: {six}, responder: echo}}
"""
    targets = [
        Target("127.0.0.1", size, echo=False, label=f"127.0.0.1:{size}"),
        Target("127.0.0.1", echo, echo=True, label=f"127.0.0.1:{echo}"),
        Target("127.0.0.1", guarded, echo=False, label=f"127.0.0.1:{guarded}"),
        Target("127.0.0.2", star, echo=True, label=f"0.0.0.0:{star}"),
        Target("127.0.0.3", star, echo=True, label=f"0.0.0.0:{star}"),
        Target("::1", star, echo=True, label=f"[::]:{star}"),
        Target("::1", six, echo=True, label=f"[::1]:{six}"),
    ]
    wanted = [
        (socket.AF_INET, "127.0.0.1", 0, "127.0.0.1"),
        (socket.AF_INET, "127.0.0.2", 0, "127.0.0.2"),
        (socket.AF_INET, "127.0.0.3", 0, "127.0.0.3"),
        (socket.AF_INET, "127.0.0.1", 7, "127.0.0.1 port 7"),
        (socket.AF_INET6, "::1", 0, "::1"),
        (socket.AF_INET6, "::1", 19, "::1 port 19"),
    ]
    # Logs are captured for the module: the autouse fixture's capture covers one test only,
    # and outside it structlog may still write to a stream an earlier test's capture closed.
    with (
        io_path(request.param),
        structlog.testing.capture_logs(),
        started(text) as daemon,
        running(daemon),
        contextlib.ExitStack() as stack,
    ):
        clients = []
        for family, host, port, name in wanted:
            sock = _client(family, host, port)
            if sock is not None:
                stack.enter_context(sock)
                clients.append(Client(sock, name))
        yield Rig(daemon, targets, clients)


def _payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


PAYLOADS = st.one_of(
    st.binary(max_size=64),
    st.builds(_payload, st.sampled_from([0, 1, 21, 22, 1472, 9000, LARGEST]), st.integers()),
    st.builds(_payload, st.integers(0, LARGEST), st.integers()),
)
# (client, target, payload, times): a datagram, repeated as a burst.
SENDS = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 6), PAYLOADS, st.integers(1, 8)),
    min_size=1,
    max_size=10,
)


def _counts(rig: Rig) -> dict[str, tuple[int, ...]]:
    """Per binding: received, sent, drops by reason, kernel drops."""
    found = {}
    for name, item in rig.daemon.served.items():
        stats = item.stats
        found[str(name)] = (
            stats.received_packets,
            stats.sent_packets,
            *stats.dropped().values(),
            item.kernel_drops() or 0,
        )
    return found


def _read(clients: list[Client]) -> list[tuple[Client, bytes, tuple[str, int]]]:
    """Every reply queued on the clients right now."""
    got = []
    for client in clients:
        while True:
            try:
                data, peer = client.sock.recvfrom(70000)
            except BlockingIOError:
                break
            got.append((client, data, (peer[0], peer[1])))
    return got


def _answered_right(client: Client, targets: list[Target], reply: bytes, peer: object) -> bool:
    for (index, payload), count in client.sent.items():
        target = targets[index]
        if count and (target.host, target.port) == peer:
            expected = payload if target.echo else b"Your data was %d bytes" % len(payload)
            if reply == expected:
                client.sent[(index, payload)] -= 1
                return True
    return False


@settings(max_examples=EXAMPLES, deadline=None)
@given(sends=SENDS)
def test_every_datagram_is_answered_or_counted_once(
    rig: Rig, sends: list[tuple[int, int, bytes, int]]
) -> None:
    _read(rig.clients)  # nothing left over from an example that failed
    before = _counts(rig)
    per_label: Counter[str] = Counter()
    for client in rig.clients:
        client.sent.clear()
    for who, where, payload, times in sends:
        client = rig.clients[who % len(rig.clients)]
        family = client.sock.family
        candidates = [
            i for i, t in enumerate(rig.targets) if (":" in t.host) == (family == socket.AF_INET6)
        ]
        index = candidates[where % len(candidates)]
        target = rig.targets[index]
        for _ in range(times):
            client.sock.sendto(payload, (target.host, target.port))
            client.sent[(index, payload)] += 1
            per_label[target.label] += 1

    def delta() -> dict[str, tuple[int, ...]]:
        now = _counts(rig)
        return {
            label: tuple(a - b for a, b in zip(now[label], before[label], strict=True))
            for label in now
        }

    def settled() -> bool:
        for label, (received, sent, *drops) in delta().items():
            kernel = drops.pop()
            # Every datagram sent reached the socket or was dropped by the kernel, and every
            # one received was answered or counted under exactly one reason.
            if received + kernel != per_label[label] or received != sent + sum(drops):
                return False
        return True

    wait_until(settled, f"every datagram answered or counted: {delta()} for {per_label}")
    answered = sum(counts[1] for counts in delta().values())
    replies: list[tuple[Client, bytes, tuple[str, int]]] = []
    end = time.monotonic() + DEADLINE
    while len(replies) < answered and time.monotonic() < end:
        replies += _read(rig.clients)
        time.sleep(0.001)
    time.sleep(0.01)  # a reply too many would have arrived by now
    replies += _read(rig.clients)
    assert len(replies) == answered
    for client, reply, peer in replies:
        assert _answered_right(client, rig.targets, reply, peer), (client.name, peer, reply[:40])


# -- configuration ----------------------------------------------------------------------------

KEYS = sorted(
    {
        *config_module.TOP_KEYS,
        *config_module.LISTENER_KEYS,
        *config_module.RATE_LIMIT_KEYS,
        *config_module.REFLECTION_KEYS,
        *config_module.METRICS_KEYS,
        *config_module.TLS_KEYS,
        *config_module.LOGGING_KEYS,
    }
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(
        [
            "*", "::", "0.0.0.0", "127.0.0.1", "::1", "fe80::1%lo", "::ffff:10.0.0.0/104",
            "10.0.0.1/8", "10.0.0.0/8", "2001:db8::/32", "lo", "eth0", "4MiB", "1e9", "nobody",
            "root", "0", "-1", "65536", "size", "echo", "discard", "dual", "ipv4", "ipv6",
            "127.0.0.1:9917", "[::1]:9917", "~", "yes", "on", "0x10", "1_000", ".inf", "2.0",
        ]
    ),
)  # fmt: skip
TREES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(
            st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), children, max_size=6
        ),
    ),
    max_leaves=40,
)
NETWORKS = st.one_of(
    st.builds(
        lambda address, prefix: f"{address}/{prefix}", st.ip_addresses(), st.integers(-1, 129)
    ),
    st.ip_addresses().map(str),
    SCALARS,
)
# Listeners near the valid ones, so the validators of every key are reached, the source
# policy's included; any key may still hold any tree.
LISTENER = st.fixed_dictionaries(
    {"interface": SCALARS, "port": st.integers(-1, 70000) | SCALARS},
    optional={
        **{key: TREES for key in sorted(config_module.LISTENER_KEYS - {"interface", "port"})},
        "allow": st.lists(NETWORKS, max_size=4) | NETWORKS,
        "deny": st.lists(NETWORKS, max_size=4) | NETWORKS,
        "rate_limit": st.dictionaries(
            st.sampled_from(sorted(config_module.RATE_LIMIT_KEYS)) | st.text(max_size=5),
            SCALARS,
        ),
        "reflection_guard": st.dictionaries(
            st.sampled_from(sorted(config_module.REFLECTION_KEYS)) | st.text(max_size=5),
            SCALARS | st.lists(st.integers(-2, 70000) | SCALARS, max_size=5),
        )
        | SCALARS,
    },
)
DOCUMENTS = st.one_of(
    TREES,
    st.fixed_dictionaries(
        {"listeners": st.lists(LISTENER, max_size=4)},
        optional={
            "user": TREES,
            "metrics": TREES,
            "logging": TREES,
        },
    ),
)
# Pieces of YAML syntax, so that random text reaches anchors, aliases, tags, merges and flows.
TOKENS = st.sampled_from(
    [
        "listeners:", "\n", "\n  - ", "  ", "\t", ": ", "- ", "{", "}", "[", "]", ", ", "&a ",
        "*a", "<<: ", "!!python/object:os.system ", "!!binary ", "!!str ", "? ", "|", ">",
        "'", '"', "#", "---", "...", "%YAML 1.1", "port: ", "interface: ", "allow: ",
        "rate_limit: ", "reflection_guard: ", "user: ", "127.0.0.1", "65535", "~", "\x00",
        "\ufeff", "é",
    ]
)  # fmt: skip
TEXTS = st.one_of(st.text(max_size=300), st.lists(TOKENS | st.text(max_size=5)).map("".join))


def _parses_or_explains(text: str) -> None:
    """``text`` is a configuration, or a ConfigError saying where and why it is not."""
    try:
        parse_text(text, "fuzz.yaml")
    except ConfigError as error:
        problems = error.problems
    else:
        return
    assert problems
    assert all(str(problem).startswith("fuzz.yaml:") for problem in problems)


@settings(max_examples=CONFIG_EXAMPLES, deadline=None)
@given(text=TEXTS)
def test_random_text_is_a_config_or_a_config_error(text: str) -> None:
    _parses_or_explains(text)


@settings(max_examples=CONFIG_EXAMPLES, deadline=None)
@given(document=DOCUMENTS)
def test_random_yaml_trees_are_a_config_or_a_config_error(document: object) -> None:
    _parses_or_explains(yaml.safe_dump(document, default_flow_style=None, allow_unicode=True))
