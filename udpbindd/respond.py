"""Responders: what a listener sends back for one datagram. Pure; payloads are never decoded.

``size`` is the classic server's "Your data was N bytes", ``echo`` returns the datagram,
``discard`` replies nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from udpbindd.config import Responder

# payload buffer, payload length -> reply (None: no reply). The buffer may be longer than n.
Reply = Callable[[memoryview, int], bytes | memoryview | None]


def size_reply(payload: memoryview, n: int) -> bytes:
    return b"Your data was %d bytes" % n


def echo_reply(payload: memoryview, n: int) -> memoryview:
    return payload[:n]


def discard_reply(payload: memoryview, n: int) -> None:
    return None


RESPONDERS: dict[Responder, Reply] = {
    Responder.SIZE: size_reply,
    Responder.ECHO: echo_reply,
    Responder.DISCARD: discard_reply,
}
