"""The systemd units in systemd/: what they promise, checked by systemd-analyze on this host.

``verify`` exits 0 even on unknown keys and bad values (they only reach stderr), so every check
asserts an empty stderr too. It also insists that ExecStart='s binary exists: the units are
verified as copies whose only change is /usr/bin/udpbindd pointing at a stub executable.
"""

from __future__ import annotations

import itertools
import re
import socket
import subprocess
from ipaddress import ip_address
from pathlib import Path

import pytest
from conftest import require_tool

from udpbindd.activation import Inherited, assign
from udpbindd.config import parse_text
from udpbindd.expand import expand_all
from udpbindd.names import SocketName

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "systemd"
SERVICE = "udpbindd.service"
SOCKET = "udpbindd.socket"
ACTIVATED = "udpbindd-activated.service"
BINARY = "/usr/bin/udpbindd"
MAX_EXPOSURE = 2.0
TIMEOUT = 60

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """Sections of a unit file, each key with every value it was given, in order."""
    sections: Unit = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def last(unit: Unit, section: str, key: str) -> str:
    """The effective value of a single-valued key (a later assignment wins)."""
    values = unit.get(section, {}).get(key)
    assert values, f"[{section}] {key}= is not set"
    return values[-1]


@pytest.fixture(scope="module")
def analyze() -> str:
    return require_tool("systemd-analyze")


@pytest.fixture
def stub_units(tmp_path: Path) -> Path:
    """Copies of the three units whose only change is ExecStart's binary, a stub that exists."""
    stub = tmp_path / "bin" / "udpbindd"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for name in (SERVICE, SOCKET, ACTIVATED):
        text = (UNITS / name).read_text()
        (units / name).write_text(text.replace(BINARY, str(stub)))
    return units


def verify(analyze: str, *paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [analyze, "verify", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.mark.parametrize("name", [SERVICE, SOCKET, ACTIVATED])
def test_verify_is_clean(analyze: str, stub_units: Path, name: str) -> None:
    done = verify(analyze, stub_units / name)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_verify_check_sees_a_typo(analyze: str, stub_units: Path) -> None:
    # The check above is only worth something if a misspelt key makes it fail.
    unit = stub_units / SERVICE
    unit.write_text(unit.read_text().replace("ProtectHome=", "ProtectHomme="))
    done = verify(analyze, unit)
    assert "Unknown key" in done.stderr
    assert "ProtectHomme" in done.stderr


@pytest.mark.parametrize("name", [SERVICE, ACTIVATED])
def test_security_exposure_is_low(analyze: str, name: str) -> None:
    # --threshold is in tenths: the command itself fails above MAX_EXPOSURE.
    done = subprocess.run(
        [
            analyze,
            "security",
            "--offline=yes",
            "--no-pager",
            f"--threshold={round(MAX_EXPOSURE * 10)}",
            str(UNITS / name),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    found = re.search(rf"Overall exposure level for {re.escape(name)}: (\d+\.\d+)", done.stdout)
    assert found is not None, done.stdout + done.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, done.stdout
    assert done.returncode == 0, done.stdout + done.stderr


def test_service_runs_the_daemon_under_systemd_supervision() -> None:
    unit = parse_unit(UNITS / SERVICE)
    assert last(unit, "Service", "Type") == "notify"
    assert last(unit, "Service", "ExecStart") == f"{BINARY} run"
    # "-": the check reports, `run` decides (see the unit's comment and the container test).
    assert last(unit, "Service", "ExecStartPre") == f"-{BINARY} check"
    assert last(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert last(unit, "Service", "WatchdogSec")
    assert last(unit, "Service", "Restart") == "on-failure"
    assert last(unit, "Service", "RestartPreventExitStatus") == "78"
    assert last(unit, "Install", "WantedBy") == "multi-user.target"


def test_service_identity_has_only_net_bind_service() -> None:
    service = parse_unit(UNITS / SERVICE)["Service"]
    assert service.get("DynamicUser") == ["yes"]
    assert "User" not in service
    assert service["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert service["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert service["NoNewPrivileges"] == ["yes"]


@pytest.mark.parametrize("name", [SERVICE, ACTIVATED])
def test_service_is_hardened(name: str) -> None:
    unit = parse_unit(UNITS / name)
    for key, value in {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        # netlink: interfaces (rtnetlink) and the host's bound sockets (sock_diag).
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    }.items():
        assert last(unit, "Service", key) == value, key
    assert unit["Service"]["SystemCallFilter"][0] == "@system-service"


def test_socket_example_hands_a_privileged_port_to_a_service_without_capabilities() -> None:
    socket_unit = parse_unit(UNITS / SOCKET)
    listen = last(socket_unit, "Socket", "ListenDatagram")
    port = int(listen.rpartition(":")[2])
    assert port < 1024, listen
    assert last(socket_unit, "Socket", "FileDescriptorName")
    assert last(socket_unit, "Socket", "Service") == ACTIVATED

    activated = parse_unit(UNITS / ACTIVATED)
    # An empty assignment is an empty set: no capability at all.
    assert last(activated, "Service", "CapabilityBoundingSet") == ""
    assert last(activated, "Service", "AmbientCapabilities") == ""
    assert last(activated, "Service", "Type") == "notify"
    assert last(activated, "Service", "ExecStart") == f"{BINARY} run"
    assert SOCKET in last(activated, "Unit", "Requires").split()
    # The two services read the same file and would fight over its ports.
    assert SERVICE in last(activated, "Unit", "Conflicts").split()


def test_socket_example_config_is_matched_to_the_socket_by_name() -> None:
    # The YAML in the unit's comment is what an operator copies: it must parse, name the
    # listener after FileDescriptorName= (systemd forbids ':', which default names contain),
    # and bind the very socket name systemd passes, so the daemon adopts it by name.
    lines = (UNITS / SOCKET).read_text().splitlines()
    start = lines.index("#   listeners:")
    block = list(itertools.takewhile(lambda line: line.startswith("#   "), lines[start:]))
    config = parse_text("\n".join(line[4:] for line in block), "udpbindd.socket comment")
    socket_unit = parse_unit(UNITS / SOCKET)
    fdname = last(socket_unit, "Socket", "FileDescriptorName")
    assert ":" not in fdname
    host, _, port = last(socket_unit, "Socket", "ListenDatagram").rpartition(":")
    bindings = expand_all(config.enabled_listeners, {}).bindings
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as placeholder:
        passed = Inherited(placeholder, fdname, SocketName(ip_address(host), int(port)))
        result = assign([passed], bindings)
    assert result.unmatched == []
    [(binding, item)] = result.adopted.items()
    assert binding.listener.name == fdname
    assert item is passed
