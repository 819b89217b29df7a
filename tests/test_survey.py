"""The pre-flight survey against real sockets: udpbindd's own are never clashes, others are."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Collection, Iterator

import pytest

from udpbindd import host
from udpbindd.config import parse_text
from udpbindd.survey import survey

LOOPBACK = {"lo": (ipaddress.ip_address("127.0.0.1"),)}


@pytest.fixture
def held() -> Iterator[socket.socket]:
    """A socket bound to 127.0.0.1 on an ephemeral port, as if udpbindd already served it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock


def _survey_port(port: int, exclude: Collection[int]) -> list[str]:
    config = parse_text(
        f"listeners:\n  - {{name: a, interface: 127.0.0.1, port: {port}}}\n", "test.yaml"
    )
    found = survey(config.listeners, interfaces=LOOPBACK, exclude_inodes=exclude, bindable=None)
    return [str(clash.other_name) for clash in found.clashes]


@pytest.mark.parametrize("kind", [set, frozenset, list, tuple])
def test_own_sockets_are_not_clashes_whatever_collection_names_them(
    held: socket.socket, kind: type[Collection[int]]
) -> None:
    port = held.getsockname()[1]
    inode = os.fstat(held.fileno()).st_ino
    assert _survey_port(port, kind([inode])) == []  # type: ignore[call-arg]


def test_a_socket_not_excluded_clashes_and_is_named(held: socket.socket) -> None:
    port = held.getsockname()[1]
    config = parse_text(
        f"listeners:\n  - {{name: a, interface: 127.0.0.1, port: {port}}}\n", "test.yaml"
    )
    found = survey(config.listeners, interfaces=LOOPBACK, exclude_inodes={1}, bindable=None)
    [clash] = found.clashes
    assert str(clash.other_name) == f"127.0.0.1:{port}"
    assert isinstance(clash.other, host.HeldSocket)
    assert clash.other.inode == os.fstat(held.fileno()).st_ino
    assert clash.other.owner is not None
    assert clash.other.owner.pid == os.getpid()
