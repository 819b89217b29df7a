"""Reload plans, pure: ``diff`` (keep, relabel, re-bind, add, remove) and ``close_order``.

Bindings are built from YAML through the same config and expansion code the daemon uses, so
each row reads like the two versions of a file an operator reloads between.
"""

from __future__ import annotations

import ipaddress

import pytest

from udpbindd.config import parse_text
from udpbindd.expand import Binding, expand_all
from udpbindd.names import SocketName
from udpbindd.plan import Plan, close_order, diff, socket_options

IFACES = {"lo": (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))}


def bindings(listeners: str) -> list[Binding]:
    config = parse_text(f"listeners:\n{listeners}", "test.yaml")
    return list(expand_all(config.listeners, IFACES).bindings)


def serving(listeners: str) -> dict[SocketName, Binding]:
    return {binding.name: binding for binding in bindings(listeners)}


def labels(items: tuple[Binding, ...] | tuple[SocketName, ...]) -> list[str]:
    return [str(item.name if isinstance(item, Binding) else item) for item in items]


def summary(plan: Plan) -> dict[str, list[str]]:
    return {
        "keep": labels(plan.keep),
        "relabel": labels(plan.relabel),
        "rebind": labels(plan.rebind),
        "add": labels(plan.add),
        "remove": labels(plan.remove),
    }


A = "  - {name: a, interface: 127.0.0.1, port: 53}\n"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(A, A, {"keep": ["127.0.0.1:53"]}, id="unchanged-is-kept"),
        pytest.param(
            A,
            "  # a comment above moves the listener down a line\n" + A,
            {"keep": ["127.0.0.1:53"]},
            id="moved-in-the-file-is-kept",
        ),
        pytest.param(
            A,
            "  - {name: b, interface: 127.0.0.1, port: 53}\n",
            {"relabel": ["127.0.0.1:53"]},
            id="name-change-is-relabel",
        ),
        pytest.param(
            A,
            "  - {name: a, interface: 127.0.0.1, port: 53, responder: echo}\n",
            {"relabel": ["127.0.0.1:53"]},
            id="responder-change-is-relabel",
        ),
        pytest.param(
            A,
            "  - {name: a, interface: 127.0.0.1, port: 53, drop_rate: 0.5}\n",
            {"relabel": ["127.0.0.1:53"]},
            id="drop-rate-change-is-relabel",
        ),
        pytest.param(
            A,
            "  - {name: a, interface: 127.0.0.1, port: 53, required: false}\n",
            {"relabel": ["127.0.0.1:53"]},
            id="required-change-is-relabel",
        ),
        pytest.param(
            A,
            "  - {name: a, interface: lo, family: ipv4, port: 53}\n",
            {"relabel": ["127.0.0.1:53"]},
            id="same-socket-written-differently-is-relabel",
        ),
        pytest.param(
            A,
            "  - {name: a, interface: 127.0.0.1, port: 53, recv_buffer: 1MiB}\n",
            {"rebind": ["127.0.0.1:53"]},
            id="recv-buffer-change-is-rebind",
        ),
        pytest.param(
            A,
            "  - {name: a, interface: 127.0.0.1, port: 53, reuse_port: true}\n",
            {"rebind": ["127.0.0.1:53"]},
            id="reuse-port-change-is-rebind",
        ),
        pytest.param(
            A,
            "  - {name: b, interface: 127.0.0.1, port: 53, freebind: true, drop_rate: 1}\n",
            {"rebind": ["127.0.0.1:53"]},
            id="freebind-and-name-change-is-rebind",
        ),
        pytest.param(
            A,
            A + "  - {name: b, interface: 127.0.0.2, port: 53}\n",
            {"keep": ["127.0.0.1:53"], "add": ["127.0.0.2:53"]},
            id="add",
        ),
        pytest.param(
            A + "  - {name: b, interface: 127.0.0.2, port: 53}\n",
            A,
            {"keep": ["127.0.0.1:53"], "remove": ["127.0.0.2:53"]},
            id="remove",
        ),
        pytest.param(
            A,
            "  - {name: a, interface: 0.0.0.0, port: 53}\n",
            {"add": ["0.0.0.0:53"], "remove": ["127.0.0.1:53"]},
            id="specific-to-wildcard-is-add-and-remove",
        ),
        pytest.param(
            "  - {name: a, interface: '*', port: 53}\n",
            "  - {name: a, interface: '*', port: 53, family: ipv4}\n",
            {"relabel": ["0.0.0.0:53"], "remove": ["[::]:53"]},
            id="wildcard-narrowed-to-one-family",
        ),
        pytest.param(
            "  - {name: a, interface: 127.0.0.1, port: 53}\n"
            "  - {name: b, interface: 127.0.0.2, port: 53}\n",
            "  - {name: a, interface: 127.0.0.2, port: 53}\n"
            "  - {name: b, interface: 127.0.0.1, port: 53}\n",
            {"relabel": ["127.0.0.2:53", "127.0.0.1:53"]},
            id="addresses-swapped-between-listeners",
        ),
        pytest.param(
            A,
            "  - {name: a, interface: 127.0.0.1, port: 54}\n",
            {"add": ["127.0.0.1:54"], "remove": ["127.0.0.1:53"]},
            id="port-change-is-a-new-socket-name",
        ),
        pytest.param("", A, {"add": ["127.0.0.1:53"]}, id="start-is-a-diff-from-nothing"),
    ],
)
def test_diff(old: str, new: str, expected: dict[str, list[str]]) -> None:
    plan = diff(serving(old) if old else {}, bindings(new))
    assert summary(plan) == {key: expected.get(key, []) for key in summary(plan)}
    assert plan.changes == any(expected.get(k) for k in ("relabel", "rebind", "add", "remove"))


def test_relabel_carries_the_new_settings_and_keep_the_serving_binding() -> None:
    old = serving("  - {name: a, interface: 127.0.0.1, port: 53}\n")
    moved = bindings("\n\n  - {name: a, interface: 127.0.0.1, port: 53}\n")
    (kept,) = diff(old, moved).keep
    assert kept is next(iter(old.values()))
    renamed = bindings("  - {name: b, interface: 127.0.0.1, port: 53, responder: echo}\n")
    (relabelled,) = diff(old, renamed).relabel
    assert relabelled is renamed[0]
    assert (relabelled.listener.name, relabelled.listener.responder.value) == ("b", "echo")


def test_opens_are_rebinds_then_adds_and_closes_are_removes_then_rebinds() -> None:
    old = serving(
        "  - {name: a, interface: 127.0.0.1, port: 53}\n"
        "  - {name: b, interface: 127.0.0.2, port: 53}\n"
    )
    plan = diff(
        old,
        bindings(
            "  - {name: c, interface: 127.0.0.3, port: 53}\n"
            "  - {name: a, interface: 127.0.0.1, port: 53, recv_buffer: 1MiB}\n"
        ),
    )
    assert labels(plan.opens) == ["127.0.0.1:53", "127.0.0.3:53"]
    assert labels(plan.closes) == ["127.0.0.2:53", "127.0.0.1:53"]


# -- close_order ------------------------------------------------------------------------------


def early_closes(closes: str, opens: str) -> list[tuple[str, list[str]]]:
    steps = close_order(bindings(opens), bindings(closes), uid=1000)
    return [(str(binding.name), [str(name) for name in first]) for binding, first in steps]


@pytest.mark.parametrize(
    ("closes", "opens", "expected"),
    [
        pytest.param(
            "  - {interface: 127.0.0.1, port: 53}\n",
            "  - {interface: 0.0.0.0, port: 53}\n",
            [("0.0.0.0:53", ["127.0.0.1:53"])],
            id="specific-to-wildcard-closes-first",
        ),
        pytest.param(
            "  - {interface: 0.0.0.0, port: 53}\n",
            "  - {interface: 127.0.0.1, port: 53}\n",
            [("127.0.0.1:53", ["0.0.0.0:53"])],
            id="wildcard-to-specific-closes-first",
        ),
        pytest.param(
            "  - {interface: 127.0.0.1, port: 53}\n  - {interface: 127.0.0.2, port: 53}\n",
            "  - {interface: 0.0.0.0, port: 53}\n",
            [("0.0.0.0:53", ["127.0.0.2:53", "127.0.0.1:53"])],
            id="wildcard-covering-two-closes-both",
        ),
        pytest.param(
            "  - {interface: 127.0.0.1, port: 53}\n",
            "  - {interface: 127.0.0.2, port: 53}\n",
            [("127.0.0.2:53", [])],
            id="disjoint-addresses-do-not",
        ),
        pytest.param(
            "  - {interface: 127.0.0.1, port: 53}\n",
            "  - {interface: 0.0.0.0, port: 54}\n",
            [("0.0.0.0:54", [])],
            id="another-port-does-not",
        ),
        pytest.param(
            "  - {interface: 127.0.0.1, port: 53}\n",
            "  - {interface: '::', port: 53}\n",
            [("[::]:53", [])],
            id="ipv6-only-wildcard-does-not",
        ),
        pytest.param(
            "  - {interface: 127.0.0.1, port: 53}\n",
            "  - {interface: '::', family: dual, port: 53}\n",
            [("[::]:53", ["127.0.0.1:53"])],
            id="dual-stack-wildcard-closes-first",
        ),
        pytest.param(
            "  - {interface: 127.0.0.1, port: 53, reuse_port: true}\n",
            "  - {interface: 0.0.0.0, port: 53, reuse_port: true}\n",
            [("0.0.0.0:53", [])],
            id="both-reuse-port-needs-no-early-close",
        ),
        pytest.param(
            "  - {interface: 127.0.0.1, port: 53}\n",
            "  - {interface: 0.0.0.0, port: 53, reuse_port: true}\n",
            [("0.0.0.0:53", ["127.0.0.1:53"])],
            id="reuse-port-on-one-side-only-closes-first",
        ),
        pytest.param(
            "  - {interface: 127.0.0.1, port: 53}\n",
            "  - {interface: 127.0.0.1, port: 53, recv_buffer: 1MiB}\n",
            [("127.0.0.1:53", ["127.0.0.1:53"])],
            id="rebind-closes-its-own-name-first",
        ),
        pytest.param(
            "  - {interface: 127.0.0.1, port: 53, reuse_port: true}\n",
            "  - {interface: 127.0.0.1, port: 53, reuse_port: true, recv_buffer: 1MiB}\n",
            [("127.0.0.1:53", [])],
            id="rebind-with-reuse-port-overlaps-instead",
        ),
        pytest.param(
            "  - {interface: 127.0.0.1, port: 53}\n",
            "  - {interface: 0.0.0.0, port: 53}\n  - {interface: 127.0.0.1, port: 53}\n",
            [("0.0.0.0:53", ["127.0.0.1:53"]), ("127.0.0.1:53", [])],
            id="each-old-socket-is-closed-once",
        ),
    ],
)
def test_close_order(closes: str, opens: str, expected: list[tuple[str, list[str]]]) -> None:
    assert early_closes(closes, opens) == expected


@pytest.mark.parametrize(
    ("buffers", "expected_rebound", "expected_first"),
    [
        pytest.param(("1MiB", "1MiB"), [], [], id="same-options-relabel-both"),
        pytest.param(
            ("1MiB", "2MiB"),
            ["127.0.0.2:53", "127.0.0.1:53"],
            [["127.0.0.2:53"], ["127.0.0.1:53"]],
            id="different-options-rebind-each-in-place",
        ),
    ],
)
def test_an_address_moving_between_two_listeners(
    buffers: tuple[str, str], expected_rebound: list[str], expected_first: list[list[str]]
) -> None:
    a, b = buffers
    old = serving(
        f"  - {{name: a, interface: 127.0.0.1, port: 53, recv_buffer: {a}}}\n"
        f"  - {{name: b, interface: 127.0.0.2, port: 53, recv_buffer: {b}}}\n"
    )
    new = bindings(
        f"  - {{name: a, interface: 127.0.0.2, port: 53, recv_buffer: {a}}}\n"
        f"  - {{name: b, interface: 127.0.0.1, port: 53, recv_buffer: {b}}}\n"
    )
    plan = diff(old, new)
    assert labels(plan.rebind) == expected_rebound
    assert len(plan.relabel) == (2 if not expected_rebound else 0)
    assert (plan.add, plan.remove, plan.keep) == ((), (), ())
    steps = close_order(plan.opens, [old[name] for name in plan.closes], uid=0)
    # A moved address is closed right before its new owner binds it, and nothing else is.
    assert [[str(name) for name in first] for _, first in steps] == expected_first


def test_a_bind_the_kernel_refuses_outright_closes_nothing() -> None:
    (old,) = bindings("  - {interface: '::', port: 53}\n")
    # A link-local address without a zone: bind() fails with EINVAL whatever else is open.
    unscoped = Binding(old.listener, SocketName(ipaddress.ip_address("fe80::1"), 53, "", True))
    assert close_order([unscoped], [old]) == [(unscoped, ())]


@pytest.mark.parametrize(
    "changed",
    ["recv_buffer: 1MiB", "reuse_port: true", "freebind: true", "responder: echo", "drop_rate: 1"],
)
def test_rebind_exactly_when_socket_options_change(changed: str) -> None:
    (old,) = bindings(A)
    (new,) = bindings(A.replace("}", f", {changed}}}"))
    plan = diff({old.name: old}, [new])
    assert bool(plan.rebind) == (socket_options(old.listener) != socket_options(new.listener))
    assert len(plan.rebind) + len(plan.relabel) == 1
