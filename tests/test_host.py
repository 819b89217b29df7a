"""The host's bound UDP sockets, their owners and its interfaces: parsers and the real thing."""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import require_netns

from udpbindd import host, netlink
from udpbindd.names import SocketName

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534
WAIT = 10.0

ip = ipaddress.ip_address
V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address

# Rows in the kernel's format on a little-endian host. udp: 127.0.0.1:35594%lo, 0.0.0.0:53 and a
# connected socket; udp6: [::]:45476 dual-stack, [::1]:1060, [::ffff:127.0.0.1]:1061, a port-0 row.
PROC_UDP = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 4615: 0100007F:8B0A 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 7450 2 000000005c8509b6 0
   53: 00000000:0035 00000000:0000 07 00000000:00000680 00:00000000 00000000   100        0 811 2 0000000000000000 2002
  901: 0100007F:E001 0200007F:0424 01 00000010:00000000 00:00000000 00000000 65534        0 9001 2 0000000000000000 0
"""  # noqa: E501
PROC_UDP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
14497: 00000000000000000000000000000000:B1A4 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 7449 2 0000000053ff782a 0
 1060: 00000000000000000000000001000000:0424 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 7451 2 0000000000000000 0
 1061: 0000000000000000FFFF00000100007F:0425 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 7452 2 0000000000000000 0
    0: 000080FE00000000FF00000001000000:0000 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 7453 2 0000000000000000 0
"""  # noqa: E501


# ---------------------------------------------------------------- /proc parser (pure)


def test_parse_proc_udp_ipv4() -> None:
    rows = host.parse_proc_udp(PROC_UDP, byteorder="little")
    assert rows[0] == host.ProcRow(
        slot=4615,
        address=V4("127.0.0.1"),
        port=35594,
        remote_address=V4("0.0.0.0"),
        remote_port=0,
        state=7,
        tx_queue=0,
        rx_queue=0,
        uid=0,
        inode=7450,
        drops=0,
    )
    assert (rows[1].address, rows[1].port, rows[1].uid) == (V4("0.0.0.0"), 53, 100)
    assert (rows[1].rx_queue, rows[1].drops) == (0x680, 2002)
    assert (rows[2].remote_address, rows[2].remote_port, rows[2].state) == (
        V4("127.0.0.2"),
        1060,
        1,
    )
    assert (rows[2].tx_queue, rows[2].uid) == (16, NOBODY)


def test_parse_proc_udp_ipv6() -> None:
    rows = host.parse_proc_udp(PROC_UDP6, byteorder="little")
    assert [(row.address, row.port, row.inode) for row in rows] == [
        (V6("::"), 45476, 7449),
        (V6("::1"), 1060, 7451),
        (V6("::ffff:127.0.0.1"), 1061, 7452),
        (V6("fe80::ff:0:1"), 0, 7453),
    ]


def test_parse_proc_udp_big_endian_words() -> None:
    text = "7: 7F000001:0424 00000000:0000 07 00000000:00000000 00:00000000 00000000 0 0 5 2 0 0"
    text += " " * 10  # the kernel pads rows with trailing spaces
    [row] = host.parse_proc_udp(text, byteorder="big")
    assert (row.address, row.port) == (V4("127.0.0.1"), 1060)


@pytest.mark.parametrize(
    "line",
    [
        " 1: 0100007F:0424 00000000:0000 07",  # too few columns
        " 1: 0100007F0424 00000000:0000 07 00000000:00000000 00:00000000 00000000 0 0 5 2 0 0",
        " 1: 01007F:0424 00000000:0000 07 00000000:00000000 00:00000000 00000000 0 0 5 2 0 0",
        " x 0100007F:0424 00000000:0000 07 00000000:00000000 00:00000000 00000000 0 0 5 2 0 0",
        " 1: 0100007F:0424 00000000:0000 07 00000000:00000000 00:00000000 00000000 0 0 x 2 0 0",
    ],
)
def test_parse_proc_udp_rejects_malformed_rows(line: str) -> None:
    with pytest.raises(ValueError, match="line 2"):
        host.parse_proc_udp("  sl  local_address\n" + line + "\n")


def test_held_socket_from_proc() -> None:
    rows = host.parse_proc_udp(PROC_UDP, byteorder="little") + host.parse_proc_udp(
        PROC_UDP6, byteorder="little"
    )
    held = [host.held_socket_from_proc(row) for row in rows]
    assert [h.name if h else None for h in held] == [
        SocketName(V4("127.0.0.1"), 35594),  # the device is not in /proc
        SocketName(V4("0.0.0.0"), 53),
        SocketName(V4("127.0.0.1"), 0xE001),
        SocketName(V6("::"), 45476, "", v6only=False),  # unknown, recorded False
        SocketName(V6("::1"), 1060, "", v6only=True),  # forced by the kernel
        SocketName(V6("::ffff:127.0.0.1"), 1061, "", v6only=False),  # required by the kernel
        None,  # port 0
    ]
    assert held[1] == host.HeldSocket(
        SocketName(V4("0.0.0.0"), 53), uid=100, inode=811, drops=2002, exact=False
    )


def test_parse_proc_udp_skips_inodes() -> None:
    text = PROC_UDP + PROC_UDP6  # header lines are skipped wherever they are
    skipped = {7450, 9001, 7452}
    rest = host.parse_proc_udp(text, byteorder="little", skip_inodes=skipped)
    everything = host.parse_proc_udp(text, byteorder="little")
    assert rest == [row for row in everything if row.inode not in skipped]
    assert [row.inode for row in rest] == [811, 7449, 7451, 7453]


def test_parse_proc_udp_skipping_still_rejects_malformed_rows() -> None:
    with pytest.raises(ValueError, match="line 2"):
        host.parse_proc_udp(
            "  sl  local_address\n 1: 0100007F:0424 00000000:0000 07\n", skip_inodes={5}
        )


# ---------------------------------------------------------------- sock_diag → HeldSocket (pure)


def _diag(
    family: int, address: str, port: int, *, ifindex: int = 0, v6only: bool | None = None
) -> netlink.InetDiagMessage:
    any_address = V4("0.0.0.0") if family == socket.AF_INET else V6("::")
    return netlink.InetDiagMessage(
        header=netlink.Header(0, netlink.SOCK_DIAG_BY_FAMILY, 0, 0, 0),
        family=family,
        state=7,
        sport=port,
        dport=0,
        src=ip(address),
        dst=any_address,
        ifindex=ifindex,
        cookie=1,
        rqueue=0,
        wqueue=0,
        uid=NOBODY,
        inode=77,
        v6only=v6only,
        drops=5,
    )


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (_diag(socket.AF_INET, "127.0.0.1", 1060), SocketName(V4("127.0.0.1"), 1060)),
        (
            _diag(socket.AF_INET, "0.0.0.0", 53, ifindex=4),
            SocketName(V4("0.0.0.0"), 53, "eth0"),
        ),
        (
            _diag(socket.AF_INET6, "::", 53, v6only=True),
            SocketName(V6("::"), 53, "", v6only=True),
        ),
        (
            _diag(socket.AF_INET6, "fe80::1", 547, ifindex=9, v6only=True),
            SocketName(V6("fe80::1"), 547, "ifindex9", v6only=True),  # device gone
        ),
        (_diag(socket.AF_INET6, "::", 0, v6only=False), None),
    ],
)
def test_held_socket_from_diag(
    message: netlink.InetDiagMessage, expected: SocketName | None
) -> None:
    held = host.held_socket_from_diag(message, {1: "lo", 4: "eth0"})
    if expected is None:
        assert held is None
    else:
        assert held == host.HeldSocket(expected, uid=NOBODY, inode=77, drops=5, exact=True)


# ---------------------------------------------------------------- interface table (pure)


def _link(
    index: int, name: str | None, *, up: bool = True, deleted: bool = False
) -> netlink.LinkMessage:
    kind = netlink.RTM_DELLINK if deleted else netlink.RTM_NEWLINK
    flags = netlink.IFF_UP if up else 0
    return netlink.LinkMessage(netlink.Header(0, kind, 0, 0, 0), 0, 1, index, flags, 0, name)


def _addr(
    index: int,
    address: str,
    *,
    flags: int = 0,
    deleted: bool = False,
    prefixlen: int = 24,
    broadcast: str | None = None,
) -> netlink.AddressMessage:
    kind = netlink.RTM_DELADDR if deleted else netlink.RTM_NEWADDR
    value = ip(address)
    family = socket.AF_INET if value.version == 4 else socket.AF_INET6
    brd = None if broadcast is None else V4(broadcast)
    return netlink.AddressMessage(
        netlink.Header(0, kind, 0, 0, 0), family, prefixlen, flags, 0, index, value, None, None, brd
    )


def test_apply_messages_builds_and_updates_the_table() -> None:
    dump: list[netlink.Message] = [
        _link(1, "lo"),
        _link(4, "eth0", up=False),
        _addr(1, "127.0.0.1", prefixlen=8),
        _addr(1, "::1", prefixlen=128),
        _addr(4, "192.0.2.1"),
        _addr(4, "192.0.2.1"),  # repeated: listed once
        _addr(4, "fe80::1", flags=netlink.IFA_F_DADFAILED),  # never bindable
        _addr(9, "198.51.100.1"),  # no such link
    ]
    table = host.apply_messages({}, dump)
    loopback = (V4("127.255.255.255"),)
    assert table == {
        "lo": host.Interface("lo", 1, True, (V4("127.0.0.1"), V6("::1")), loopback),
        "eth0": host.Interface("eth0", 4, False, (V4("192.0.2.1"),), (V4("192.0.2.255"),)),
    }
    events: list[netlink.Message] = [
        _link(4, "wan0"),  # renamed and up: addresses stay
        _addr(4, "2001:db8::1"),
        _addr(1, "::1", deleted=True),
        _link(5, "veth0"),
        _link(5, None),  # a NEWLINK without a name keeps the old one
        _link(6, None),  # and an unknown link without a name is skipped
        _link(5, "veth0", deleted=True),
    ]
    assert host.apply_messages(table, events) == {
        "lo": host.Interface("lo", 1, True, (V4("127.0.0.1"),), loopback),
        "wan0": host.Interface(
            "wan0", 4, True, (V4("192.0.2.1"), V6("2001:db8::1")), (V4("192.0.2.255"),)
        ),
    }


def _broadcasts(table: dict[str, host.Interface], name: str = "eth0") -> list[str]:
    return [str(address) for address in table[name].broadcasts]


def test_apply_messages_keeps_each_subnet_broadcast_while_an_address_has_it() -> None:
    table = host.apply_messages(
        {},
        [
            _link(2, "eth0"),
            _addr(2, "10.9.0.1", broadcast="10.9.0.255"),  # IFA_BROADCAST, as `brd +` sets
            _addr(2, "10.9.0.2"),  # a secondary in the same subnet, no attribute: the same
            _addr(2, "10.8.0.1", prefixlen=25),  # computed: the last address of the /25
            _addr(2, "192.0.2.9", prefixlen=31),  # a /31 and a /32 have none
            _addr(2, "192.0.2.10", prefixlen=32),
            _addr(2, "2001:db8::1", prefixlen=64),  # nor does IPv6
        ],
    )
    assert _broadcasts(table) == ["10.9.0.255", "10.8.0.127"]
    # Events: one of two addresses with that broadcast goes, then the other.
    table = host.apply_messages(table, [_addr(2, "10.9.0.2", deleted=True)])
    assert _broadcasts(table) == ["10.9.0.255", "10.8.0.127"]
    table = host.apply_messages(table, [_addr(2, "10.9.0.1", deleted=True)])
    assert _broadcasts(table) == ["10.8.0.127"]
    assert V4("10.9.0.1") not in table["eth0"].addresses
    # An address announced again with another broadcast: the new one replaces the old.
    table = host.apply_messages(table, [_addr(2, "10.8.0.1", prefixlen=25, broadcast="10.8.0.126")])
    assert _broadcasts(table) == ["10.8.0.126"]
    # A new subnet brings its broadcast; a rename and a link going down keep them all.
    table = host.apply_messages(
        table, [_addr(2, "198.51.100.7", broadcast="198.51.100.255"), _link(2, "wan0", up=False)]
    )
    assert _broadcasts(table, "wan0") == ["10.8.0.126", "198.51.100.255"]
    assert table["wan0"].addresses == (
        V4("10.8.0.1"),
        V4("192.0.2.9"),
        V4("192.0.2.10"),
        V6("2001:db8::1"),
        V4("198.51.100.7"),
    )
    # The link goes, and every broadcast with it.
    assert host.apply_messages(table, [_link(2, "wan0", deleted=True)]) == {}


def test_apply_messages_tells_an_address_of_two_prefixes_apart() -> None:
    # The kernel keeps 10.9.0.1/24 and 10.9.0.1/25 as two addresses, each with its broadcast.
    table = host.apply_messages(
        {},
        [_link(2, "eth0"), _addr(2, "10.9.0.1"), _addr(2, "10.9.0.1", prefixlen=25)],
    )
    assert _broadcasts(table) == ["10.9.0.255", "10.9.0.127"]
    table = host.apply_messages(table, [_addr(2, "10.9.0.1", prefixlen=25, deleted=True)])
    assert _broadcasts(table) == ["10.9.0.255"]


# ---------------------------------------------------------------- find_owners on a fake /proc


def _fake_process(
    proc: Path, pid: int, comm: str | None, inodes: list[int], cmdline: bytes = b""
) -> None:
    fd = proc / str(pid) / "fd"
    fd.mkdir(parents=True)
    for number, inode in enumerate(inodes, start=3):
        (fd / str(number)).symlink_to(f"socket:[{inode}]")
    (fd / "0").symlink_to("/dev/null")
    (fd / "1").symlink_to("pipe:[5]")
    if comm is not None:
        (proc / str(pid) / "comm").write_text(comm + "\n")
    (proc / str(pid) / "cmdline").write_bytes(cmdline)


def test_find_owners_on_a_fake_proc(tmp_path: Path) -> None:
    _fake_process(tmp_path, 1, "systemd", [100, 200])
    _fake_process(tmp_path, 40, "named", [100])
    _fake_process(tmp_path, 41, "named", [100, 300])
    _fake_process(tmp_path, 50, "", [400], cmdline=b"/usr/sbin/dnsmasq\0-k\0")
    _fake_process(tmp_path, 60, None, [500])  # exited while being read
    (tmp_path / "self").mkdir()
    (tmp_path / "net").mkdir()
    owners = host.find_owners([100, 200, 300, 400, 500, 600], proc=str(tmp_path))
    assert owners == {
        100: host.Owner(40, "named"),  # lowest pid, and init only as the last resort
        200: host.Owner(1, "systemd"),
        300: host.Owner(41, "named"),
        400: host.Owner(50, "dnsmasq"),
    }


def test_find_owners_without_inodes_or_proc(tmp_path: Path) -> None:
    assert host.find_owners([]) == {}
    assert host.find_owners([1], proc=str(tmp_path / "missing")) == {}


# ---------------------------------------------------------------- sysctls


def test_udp_hash_entries() -> None:
    text = Path(host.UDP_HASH_ENTRIES).read_text().strip()
    assert host.udp_hash_entries() == abs(int(text))


def test_ip_local_port_range() -> None:
    low, high = (int(word) for word in Path(host.IP_LOCAL_PORT_RANGE).read_text().split())
    assert host.ip_local_port_range() == (low, high)


# ---------------------------------------------------------------- real sockets on this host


def _comm() -> str:
    return Path("/proc/self/comm").read_text().rstrip("\n")


def _udp(
    family: int, address: str, *, v6only: int | None = None, device: bytes = b""
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if v6only is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        if device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device)
        sock.bind((address, 0))
    except OSError:
        sock.close()
        raise
    return sock


@pytest.fixture
def bound() -> Iterator[list[tuple[socket.socket, SocketName]]]:
    """Real sockets on loopback, each with the socket name held_sockets() must report."""
    specs = [
        (socket.AF_INET, "127.0.0.1", None, b"", "", False),
        (socket.AF_INET6, "::1", 0, b"", "", True),  # a specific IPv6 bind forces V6ONLY
        (socket.AF_INET6, "::ffff:127.0.0.1", 0, b"", "", False),
        (socket.AF_INET6, "::", 0, b"", "", False),
        (socket.AF_INET6, "::", 1, b"", "", True),
        (socket.AF_INET, "127.0.0.1", None, b"lo", "lo", False),
    ]
    made: list[tuple[socket.socket, SocketName]] = []
    try:
        for family, address, v6only, device, name, expected_v6only in specs:
            sock = _udp(family, address, v6only=v6only, device=device)
            port = sock.getsockname()[1]
            made.append((sock, SocketName(ip(address), port, name, expected_v6only)))
        yield made
    finally:
        for sock, _ in made:
            sock.close()


def test_held_sockets_finds_each_bound_socket(
    bound: list[tuple[socket.socket, SocketName]],
) -> None:
    by_inode = {held.inode: held for held in host.held_sockets()}
    for sock, name in bound:
        held = by_inode[os.fstat(sock.fileno()).st_ino]
        assert held.name == name
        assert held.uid == os.getuid()
        assert held.exact
        assert held.drops == 0
        assert held.owner == host.Owner(os.getpid(), _comm())


def test_held_sockets_skips_port_zero_and_is_sorted() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unbound:
        inode = os.fstat(unbound.fileno()).st_ino
        held = host.held_sockets(owners=False)
    assert inode not in {h.inode for h in held}
    assert all(h.name.port != 0 and h.owner is None for h in held)
    assert held == sorted(held, key=lambda h: (h.name.sort_key(), h.inode))


def _proc_rows() -> dict[int, host.ProcRow]:
    rows: dict[int, host.ProcRow] = {}
    for path in host.PROC_UDP:
        rows.update((row.inode, row) for row in host.parse_proc_udp(Path(path).read_text()))
    return rows


def _as_proc_sees_it(name: SocketName) -> SocketName:
    v6only = name.v6only if name.family == 6 and name.address != V6("::") else False
    return SocketName(name.address, name.port, "", v6only)


def test_proc_parser_finds_the_same_sockets(bound: list[tuple[socket.socket, SocketName]]) -> None:
    rows = _proc_rows()
    for sock, name in bound:
        inode = os.fstat(sock.fileno()).st_ino
        held = host.held_socket_from_proc(rows[inode])
        assert held == host.HeldSocket(
            _as_proc_sees_it(name), uid=os.getuid(), inode=inode, drops=0, exact=False
        )


def test_held_sockets_falls_back_to_proc(
    bound: list[tuple[socket.socket, SocketName]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable(*_args: object, **_kwargs: object) -> list[netlink.Message]:
        raise netlink.NetlinkError(errno.ENOENT, "no udp_diag")

    monkeypatch.setattr(netlink, "dump", unavailable)
    by_inode = {held.inode: held for held in host.held_sockets()}
    for sock, name in bound:
        held = by_inode[os.fstat(sock.fileno()).st_ino]
        assert held.name == _as_proc_sees_it(name)
        assert not held.exact
        assert held.owner == host.Owner(os.getpid(), _comm())


@pytest.mark.parametrize("source", ["sock_diag", "proc"])
def test_excluded_inodes_are_left_out_as_if_filtered_afterwards(
    bound: list[tuple[socket.socket, SocketName]], source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if source == "proc":

        def unavailable(*_args: object, **_kwargs: object) -> list[netlink.Message]:
            raise netlink.NetlinkError(errno.ENOENT, "no udp_diag")

        monkeypatch.setattr(netlink, "dump", unavailable)
    inodes = [os.fstat(sock.fileno()).st_ino for sock, _ in bound]
    own = set(inodes[::2])  # every other one: both families are on each side
    mine = set(inodes)
    # Only this test's sockets: others on the host may come and go between the two reads.
    excluded = [h for h in host.held_sockets(exclude_inodes=own) if h.inode in mine]
    filtered = [h for h in host.held_sockets() if h.inode in mine - own]
    assert excluded == filtered
    assert {h.inode for h in excluded} == mine - own


def test_drops_agree_with_proc() -> None:
    with (
        _udp(socket.AF_INET, "127.0.0.1") as receiver,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
    ):
        # The smallest receive buffer holds two small datagrams; the rest are dropped.
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        for _ in range(50):
            sender.sendto(b"x" * 200, receiver.getsockname())
        inode = os.fstat(receiver.fileno()).st_ino
        [held] = [h for h in host.held_sockets(owners=False) if h.inode == inode]
        row = _proc_rows()[inode]
    assert held.drops > 0
    assert held.drops == row.drops


def _read_line(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        readable, _, _ = select.select([fd], [], [], max(remaining, 0))
        if not readable:
            raise TimeoutError("the child did not report in time")
        chunk = os.read(fd, 256)
        if not chunk:
            raise EOFError("the child exited before reporting")
        data += chunk
    return data.decode()


def _reap(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_socket_of_another_uid_and_process() -> None:
    report_r, report_w = os.pipe()
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(report_r)
            os.close(release_w)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            line = f"{sock.getsockname()[1]} {os.fstat(sock.fileno()).st_ino}\n"
            os.write(report_w, line.encode())
            select.select([release_r], [], [], 3 * WAIT)  # until the parent lets go
            code = 0
        finally:
            os._exit(code)
    os.close(report_w)
    os.close(release_r)
    try:
        port, inode = (int(word) for word in _read_line(report_r, WAIT).split())
        [held] = [h for h in host.held_sockets() if h.inode == inode]
    finally:
        os.close(release_w)
        os.close(report_r)
        _reap(pid, WAIT)
    assert held.name == SocketName(V4("127.0.0.1"), port)
    assert held.uid == NOBODY
    assert held.owner == host.Owner(pid, _comm())  # a forked child keeps its parent's comm


def test_interfaces_of_this_host() -> None:
    table = host.interfaces()
    lo = table["lo"]
    assert lo.name == "lo"
    assert lo.index == socket.if_nametoindex("lo")
    assert lo.up
    assert V4("127.0.0.1") in lo.addresses
    assert V6("::1") in lo.addresses
    assert {name: i.index for name, i in table.items()} == {
        name: index for index, name in socket.if_nameindex()
    }


# ---------------------------------------------------------------- a namespace with a veth pair

NETNS_SNIPPET = r"""
import ipaddress, json, os, select, socket, subprocess, time
from udpbindd import host, netlink

NEW = ipaddress.ip_address("198.51.100.7")

before = host.interfaces()
with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as linklocal:
    # The zone goes in the scope id: a "%va" suffix in a 2-tuple is not passed to bind().
    linklocal.bind(("fe80::1", 0, 0, socket.if_nametoindex("va")))
    inode = os.fstat(linklocal.fileno()).st_ino
    [held] = [h for h in host.held_sockets() if h.inode == inode]

groups = netlink.RTMGRP_LINK | netlink.RTMGRP_IPV4_IFADDR | netlink.RTMGRP_IPV6_IFADDR
with netlink.open_socket(netlink.NETLINK_ROUTE, groups) as sub:
    subprocess.run(["ip", "addr", "add", "198.51.100.7/24", "dev", "va"], check=True, timeout=10)
    subprocess.run(["ip", "link", "set", "vb", "down"], check=True, timeout=10)
    deadline = time.monotonic() + 10
    after = before
    while time.monotonic() < deadline:
        if NEW in after["va"].addresses and not after["vb"].up:
            break
        readable, _, _ = select.select([sub], [], [], max(deadline - time.monotonic(), 0))
        if readable:
            after = host.apply_messages(after, netlink.parse_messages(sub.recv(65536)))

def table(interfaces):
    return {
        name: {
            "index": i.index,
            "up": i.up,
            "addresses": [str(a) for a in i.addresses],
            "broadcasts": [str(a) for a in i.broadcasts],
        }
        for name, i in interfaces.items()
    }

print(json.dumps({
    "before": table(before),
    "after": table(after),
    "indexes": {name: index for index, name in socket.if_nameindex()},
    "held": {"name": str(held.name), "device": held.name.device, "exact": held.exact},
}))
"""


def _ip_cmd(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=WAIT, capture_output=True)


@pytest.mark.netns
def test_interfaces_in_a_namespace_with_veth() -> None:
    require_netns()
    namespace = f"udpbt-{secrets.token_hex(4)}"
    _ip_cmd("netns", "add", namespace)
    try:
        _ip_cmd("-n", namespace, "link", "add", "va", "type", "veth", "peer", "name", "vb")
        _ip_cmd("-n", namespace, "link", "set", "va", "up")
        _ip_cmd("-n", namespace, "link", "set", "vb", "up")
        _ip_cmd("-n", namespace, "addr", "add", "192.0.2.1/24", "dev", "va")
        _ip_cmd(
            "-n", namespace, "addr", "add", "203.0.113.1/24", "brd", "203.0.113.127", "dev", "vb"
        )
        _ip_cmd("-n", namespace, "addr", "add", "2001:db8::1/64", "dev", "va", "nodad")
        _ip_cmd("-n", namespace, "addr", "add", "fe80::1/64", "dev", "va", "nodad")
        result = subprocess.run(
            ["ip", "netns", "exec", namespace, sys.executable, "-c", NETNS_SNIPPET],
            check=True,
            timeout=3 * WAIT,
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=False, timeout=WAIT)
    seen = json.loads(result.stdout)
    before, after = seen["before"], seen["after"]
    assert set(before) == {"lo", "va", "vb"}
    assert {name: i["index"] for name, i in before.items()} == seen["indexes"]
    assert before["va"]["up"]
    assert {"192.0.2.1", "2001:db8::1", "fe80::1"} <= set(before["va"]["addresses"])
    assert not before["lo"]["up"]  # a new namespace's loopback starts down
    # The link-local zone is the bound device, and only sock_diag can tell.
    assert seen["held"]["name"].startswith("[fe80::1%va]:")
    assert (seen["held"]["device"], seen["held"]["exact"]) == ("va", True)
    assert after["va"]["addresses"][-1] == "198.51.100.7"
    assert not after["vb"]["up"]
    # From the dump and from an event alike: IFA_BROADCAST when set, else the subnet's last.
    assert before["va"]["broadcasts"] == ["192.0.2.255"]
    assert after["va"]["broadcasts"] == ["192.0.2.255", "198.51.100.255"]
    assert before["vb"]["broadcasts"] == after["vb"]["broadcasts"] == ["203.0.113.127"]
    assert before["lo"]["broadcasts"] == []  # no address yet: lo is down in a new namespace
