"""The classic UDP client: send, wait 0.1 s doubling up to a limit, print the reply.

Retries with exponential backoff, as a UDP client must: a lost request or reply looks the same
as a slow server. Connecting the socket lets the kernel report "port unreachable" as refused.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

FIRST_WAIT = 0.1
DEFAULT_MESSAGE = "This is another message"


class ProbeFailed(Exception):
    """No reply came, or the port was refused."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    client: str
    server: str
    reply: bytes
    attempts: int


def _format(address: tuple[object, ...]) -> str:
    host, port = str(address[0]), address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def probe(
    host: str,
    port: int,
    message: bytes,
    max_wait: float = 2.0,
    *,
    on_connected: Callable[[str], None] | None = None,
) -> ProbeResult:
    """Send ``message`` to host:port and return the first reply.

    ``on_connected`` is given the client's socket name before the first send, so a caller can
    show it while the probe is still waiting.

    Raises:
        ProbeFailed: the host could not be resolved, the port was refused, or nothing answered
            before the wait grew past ``max_wait`` seconds.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as error:
        raise ProbeFailed(f"cannot resolve {host!r}: {error}") from None
    family, kind, proto, _, address = infos[0]
    server = _format(address)
    with socket.socket(family, kind, proto) as sock:
        try:
            sock.connect(address)
        except OSError as error:
            raise ProbeFailed(f"cannot reach {server}: {error.strerror}") from None
        client = _format(sock.getsockname())
        if on_connected is not None:
            on_connected(client)
        wait, attempts = FIRST_WAIT, 0
        while True:
            attempts += 1
            try:
                sock.send(message)
                sock.settimeout(wait)
                reply = sock.recv(65535)
            except TimeoutError:
                wait *= 2
                if wait > max_wait:
                    raise ProbeFailed(
                        f"no reply from {server} after {attempts} tries: the server is down, "
                        "or the datagrams are being lost"
                    ) from None
                continue
            except ConnectionRefusedError:
                raise ProbeFailed(
                    f"{server} refused the datagram (ICMP port unreachable): nothing is "
                    "listening on that address and port"
                ) from None
            except OSError as error:
                raise ProbeFailed(f"{server}: {error.strerror}") from None
            return ProbeResult(client, server, reply, attempts)


def printable(data: bytes) -> str:
    """A reply as text that is safe to print: UTF-8 as is, anything else escaped.

    Control characters are escaped too, so a reply cannot drive the user's terminal.
    """
    text = data.decode("utf-8", errors="backslashreplace")
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
