"""The loop's selector: real sockets, real epoll, and the ``selectors`` contract it keeps."""

from __future__ import annotations

import selectors
import socket
from collections.abc import Iterator

import pytest

from udpbindd import poller
from udpbindd.poller import ReadSelector

READ = selectors.EVENT_READ


@pytest.fixture
def selector() -> Iterator[ReadSelector]:
    with ReadSelector() as opened:
        yield opened


def pair() -> tuple[socket.socket, socket.socket]:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return receiver, sender


def test_ready_gives_the_data_of_ready_files_only(selector: ReadSelector) -> None:
    sockets = [pair() for _ in range(3)]
    try:
        for index, (receiver, _) in enumerate(sockets):
            selector.register(receiver, READ, f"data {index}")
        assert selector.ready(0) == []
        for index in (0, 2):
            receiver, sender = sockets[index]
            sender.sendto(b"x", receiver.getsockname())
        assert sorted(selector.ready(1.0)) == ["data 0", "data 2"]
        # Level-triggered: still ready until read.
        assert sorted(selector.ready(0)) == ["data 0", "data 2"]
        sockets[0][0].recv(16)
        assert selector.ready(1.0) == ["data 2"]
    finally:
        for receiver, sender in sockets:
            receiver.close()
            sender.close()


def test_select_and_get_map_keep_the_selectors_contract(selector: ReadSelector) -> None:
    receiver, sender = pair()
    with receiver, sender:
        key = selector.register(receiver, READ, None)  # None is data like any other
        assert (key.fd, key.events, key.data) == (receiver.fileno(), READ, None)
        assert len(selector.get_map()) == 1
        assert selector.get_key(receiver).data is None
        assert list(selector.get_map()) == [receiver.fileno()]
        sender.sendto(b"x", receiver.getsockname())
        [(ready, events)] = selector.select(1.0)
        assert (ready.fd, ready.data, events) == (receiver.fileno(), None, READ)
        selector.modify(receiver, READ, "new")
        assert selector.ready(1.0) == ["new"]
        assert selector.unregister(receiver).data == "new"
        assert len(selector.get_map()) == 0
        assert selector.ready(0) == []
        with pytest.raises(KeyError):
            selector.get_key(receiver)


def test_misuse_is_refused(selector: ReadSelector) -> None:
    receiver, sender = pair()
    with receiver, sender:
        selector.register(receiver, READ)
        with pytest.raises(KeyError):
            selector.register(receiver, READ)
        with pytest.raises(ValueError, match="only EVENT_READ"):
            selector.modify(receiver, selectors.EVENT_WRITE)
        with pytest.raises(KeyError):
            selector.unregister(sender)
        with pytest.raises(KeyError):
            selector.modify(sender, READ)
        with pytest.raises(ValueError, match="only EVENT_READ"):
            selector.register(sender, READ | selectors.EVENT_WRITE)
    # Closed: its descriptor is -1, which no selector can look up.
    with pytest.raises(ValueError, match="must be open"):
        selector.unregister(receiver)


def test_a_descriptor_number_used_again_is_a_new_registration(selector: ReadSelector) -> None:
    first, sender = pair()
    fd = first.fileno()
    selector.register(first, READ, "first")
    selector.unregister(first)
    first.close()
    second, _ = pair()
    with second, sender, _:
        # The kernel hands out the lowest free number: usually the very same one.
        selector.register(second, READ, "second")
        sender.sendto(b"x", second.getsockname())
        assert selector.ready(1.0) == ["second"]
        if second.fileno() == fd:
            assert selector.get_key(fd).data == "second"


def test_many_files_at_once_are_taken_a_bounded_number_per_wake_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A small bound, so that few descriptors show it (the default soft limit is 1,024).
    monkeypatch.setattr(poller, "MAX_EVENTS", 8)
    count = 30
    receivers, sender = [], socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with ReadSelector() as selector, sender:
        try:
            for index in range(count):
                receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                receivers.append(receiver)
                receiver.bind(("127.0.0.1", 0))
                receiver.setblocking(False)
                selector.register(receiver, READ, index)
            for receiver in receivers:
                sender.sendto(b"x", receiver.getsockname())
            seen: set[int] = set()
            for _ in range(10):  # bounded: every socket is ready, so each pass takes some
                batch = selector.ready(1.0)
                assert 0 < len(batch) <= 8
                for index in batch:
                    receivers[index].recv(16)
                seen.update(batch)
                if len(seen) == count:
                    break
            assert seen == set(range(count))
            assert len(selector.get_map()) == count
        finally:
            for receiver in receivers:
                receiver.close()


def test_closing_forgets_everything() -> None:
    selector = ReadSelector()
    receiver, sender = pair()
    with receiver, sender:
        selector.register(receiver, READ, "x")
        selector.close()
        assert len(selector.get_map()) == 0
        with pytest.raises(ValueError, match="closed"):
            selector.ready(0)


def test_a_file_epoll_dropped_already_can_be_unregistered_and_its_number_reused() -> None:
    with ReadSelector() as selector:
        receiver, sender = pair()
        with receiver, sender:
            selector.register(receiver, READ, "first")
            # Taken out of epoll behind the selector's back (as when the kernel drops a
            # closed file): unregistering must still forget it.
            selector._epoll.unregister(receiver.fileno())
            assert selector.unregister(receiver).data == "first"
            selector.register(receiver, READ, "again")
            sender.sendto(b"x", receiver.getsockname())
            assert selector.ready(1.0) == ["again"]
