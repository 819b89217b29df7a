"""sockets.open_udp against the real kernel: options, the granted buffer, errno → BindError."""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import selectors
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import free_port, free_port_both, require_root, require_tool

from udpbindd.names import SocketName
from udpbindd.sockets import (
    IP_FREEBIND,
    BindError,
    Options,
    kernel_drops,
    open_udp,
    set_receive_buffer,
)

RMEM_MAX = int(Path("/proc/sys/net/core/rmem_max").read_text())
REPO = Path(__file__).resolve().parent.parent


def name(address: str, port: int, device: str = "", v6only: bool | None = None) -> SocketName:
    ip = ipaddress.ip_address(address)
    if v6only is None:
        v6only = ip.version == 6
    return SocketName(ip, port, device, v6only)


def run_without_capabilities(script: str) -> subprocess.CompletedProcess[str]:
    """Run a Python script as root without CAP_NET_ADMIN and CAP_NET_BIND_SERVICE."""
    require_root()
    setpriv = require_tool("setpriv")
    return subprocess.run(
        [setpriv, "--bounding-set=-net_admin,-net_bind_service", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )


def device_of(sock: socket.socket) -> str:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 64)
    return raw.split(b"\0", 1)[0].decode()


def test_ipv4_socket_is_bound_nonblocking_cloexec_and_never_reuseaddr() -> None:
    port = free_port()
    sock, granted = open_udp(name("127.0.0.1", port), Options())
    with sock:
        assert sock.getsockname() == ("127.0.0.1", port)
        assert sock.type == socket.SOCK_DGRAM
        assert not sock.getblocking()
        assert fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        assert fcntl.fcntl(sock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        assert granted == sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        # Non-blocking: an empty queue is an immediate EAGAIN, never a wait.
        with pytest.raises(BlockingIOError):
            sock.recv(1)


@pytest.mark.parametrize(
    ("address", "v6only"),
    [("::1", True), ("::", True), ("::", False)],
)
def test_ipv6_v6only_is_set_explicitly(address: str, v6only: bool) -> None:
    port = free_port_both()
    sock, _ = open_udp(name(address, port, v6only=v6only), Options())
    with sock:
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == int(v6only)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
        assert not sock.getblocking()


def test_dual_stack_socket_receives_ipv4_and_v6only_socket_leaves_it() -> None:
    port = free_port_both()
    dual, _ = open_udp(name("::", port, v6only=False), Options())
    with dual, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(b"over ipv4", ("127.0.0.1", port))
        dual.settimeout(5)
        data, peer = dual.recvfrom(100)
        assert data == b"over ipv4"
        assert peer[0] == "::ffff:127.0.0.1"
    # With V6ONLY=1 the IPv4 wildcard on the same port stays free for its own socket.
    six, _ = open_udp(name("::", port, v6only=True), Options())
    with six:
        four, _ = open_udp(name("0.0.0.0", port), Options())
        four.close()


@pytest.mark.netns
def test_v6only_does_not_follow_bindv6only_sysctl() -> None:
    """In a namespace with net.ipv6.bindv6only=1, a dual-stack listener still gets V6ONLY=0."""
    require_root()
    require_tool("ip")
    from netns import namespace

    script = textwrap.dedent(
        """
        import ipaddress, socket
        from udpbindd.names import SocketName
        from udpbindd.sockets import Options, open_udp
        with open("/proc/sys/net/ipv6/bindv6only", "w") as f:
            f.write("1")
        any6 = ipaddress.ip_address("::")
        for v6only in (False, True):
            sock, _ = open_udp(SocketName(any6, 4000, "", v6only), Options())
            with sock:
                print(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
        """
    )
    with namespace(prefix="udpso") as ns:
        done = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "1"]


def test_receive_buffer_within_rmem_max_is_granted_doubled() -> None:
    request = min(64 * 1024, RMEM_MAX)
    sock, granted = open_udp(name("127.0.0.1", 0), Options(recv_buffer=request))
    with sock:
        # The kernel doubles the request for its own bookkeeping and reports the double.
        assert granted == 2 * request
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == granted


def test_receive_buffer_above_rmem_max_is_forced_with_cap_net_admin() -> None:
    require_root()
    request = RMEM_MAX + 1024 * 1024
    sock, granted = open_udp(name("127.0.0.1", 0), Options(recv_buffer=request))
    with sock:
        assert granted == 2 * request


def test_receive_buffer_without_capability_is_what_the_kernel_granted() -> None:
    """Without CAP_NET_ADMIN the request is capped at rmem_max, and the cap is reported."""
    script = textwrap.dedent(
        f"""
        import ipaddress
        from udpbindd.names import SocketName
        from udpbindd.sockets import Options, open_udp
        sock, granted = open_udp(
            SocketName(ipaddress.ip_address("127.0.0.1"), 0), Options(recv_buffer={RMEM_MAX * 4})
        )
        sock.close()
        print(granted)
        """
    )
    done = run_without_capabilities(script)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 2 * RMEM_MAX


def test_set_receive_buffer_zero_keeps_the_kernel_default() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        default = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert set_receive_buffer(sock, 0) == default


def test_reuse_port_and_freebind_are_set() -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface here: only freebind lets it bind.
    sock, _ = open_udp(name("192.0.2.1", free_port()), Options(reuse_port=True, freebind=True))
    with sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert sock.getsockopt(socket.SOL_IP, IP_FREEBIND) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0


def test_address_not_on_this_host_is_eaddrnotavail() -> None:
    with pytest.raises(BindError) as caught:
        open_udp(name("192.0.2.1", free_port()), Options())
    error = caught.value
    assert error.errno == errno.EADDRNOTAVAIL
    assert error.errno_name == "EADDRNOTAVAIL"
    assert error.step == "bind"
    assert error.meaning.startswith("address not available")
    assert "freebind" in error.meaning


def test_port_in_use_is_eaddrinuse_and_the_socket_is_closed() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(BindError) as caught:
            open_udp(name("127.0.0.1", port), Options())
        # The refused socket was closed, not left for the garbage collector.
        assert set(os.listdir("/proc/self/fd")) == before
    error = caught.value
    assert error.errno == errno.EADDRINUSE
    assert error.meaning.startswith("address already in use")
    assert str(error) == f"127.0.0.1:{port}: bind: {error.meaning}"


def test_wildcard_after_specific_address_is_refused_by_the_kernel() -> None:
    port = free_port()
    specific, _ = open_udp(name("127.0.0.1", port), Options())
    with specific, pytest.raises(BindError) as caught:
        open_udp(name("0.0.0.0", port), Options())
    assert caught.value.errno == errno.EADDRINUSE


def test_bound_device_is_set() -> None:
    require_root()  # SO_BINDTODEVICE needs CAP_NET_RAW
    sock, _ = open_udp(name("127.0.0.1", free_port(), device="lo"), Options())
    with sock:
        assert device_of(sock) == "lo"


def test_missing_device_is_enodev_at_the_device_step() -> None:
    require_root()
    with pytest.raises(BindError) as caught:
        open_udp(name("127.0.0.1", free_port(), device="nosuchdev0"), Options())
    assert caught.value.errno == errno.ENODEV
    assert caught.value.step == "binding to device nosuchdev0"
    assert caught.value.meaning == "no such device"


def test_link_local_zone_that_does_not_exist_is_enodev() -> None:
    with pytest.raises(BindError) as caught:
        open_udp(name("fe80::1", 4000, device="nosuchdev0"), Options())
    assert caught.value.errno == errno.ENODEV
    assert caught.value.step == "looking up zone nosuchdev0"


def test_privileged_port_without_capability_is_eacces() -> None:
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if start <= 1:
        pytest.skip("net.ipv4.ip_unprivileged_port_start lets anyone bind every port")
    script = textwrap.dedent(
        """
        import ipaddress
        from udpbindd.names import SocketName
        from udpbindd.sockets import BindError, Options, open_udp
        try:
            open_udp(SocketName(ipaddress.ip_address("127.0.0.1"), 1), Options())
        except BindError as error:
            print(error.errno_name, error.meaning, sep="|")
        """
    )
    done = run_without_capabilities(script)
    assert done.returncode == 0, done.stderr
    errno_name, meaning = done.stdout.strip().split("|")
    assert errno_name == "EACCES"
    assert "CAP_NET_BIND_SERVICE" in meaning


def test_kernel_drops_counts_datagrams_a_full_queue_refused() -> None:
    # The smallest receive buffer fills after a few datagrams; the kernel drops the rest.
    sock, _ = open_udp(name("127.0.0.1", 0), Options(recv_buffer=1))
    sent = 50
    with sock, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        assert kernel_drops(sock) == 0
        for _ in range(sent):
            client.sendto(b"x" * 1000, sock.getsockname())
        queued = 0
        # Every datagram is either queued or dropped; wait (bounded) until all are accounted
        # for, in case the kernel is still delivering some when the sends return.
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            deadline = time.monotonic() + 5
            while queued + (kernel_drops(sock) or 0) < sent and time.monotonic() < deadline:
                if selector.select(0.05):
                    sock.recv(2000)
                    queued += 1
        drops = kernel_drops(sock)
    assert drops is not None
    assert 0 < queued < sent
    assert queued + drops == sent
