"""The Debian package: built by packaging/build-deb, inspected, then installed in a container.

The container runs a real systemd as PID 1 (see container.py), so these tests see what an
operator sees: the postinst enables and starts the unit; the unit stays activating until the
daemon's READY=1 and shows its STATUS=; reload applies a changed file in the same process; the
watchdog restarts a frozen daemon; the daemon runs as an unprivileged user yet binds port 999;
the example .socket unit hands it a socket it serves; removing the package stops it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import require, require_tool
from container import Container, ensure_rootfs, require_container

from udpbindd.config import load, load_default

REPO = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT = 600
UNIT = "udpbindd.service"
DEB_MOUNT = "/mnt/udpbindd"
EXAMPLES = "/usr/share/doc/udpbindd/examples"
CONFFILE = "/etc/udpbindd/udpbindd.yaml"
PYTHON_DEPENDS = {
    "python3-yaml",
    "python3-structlog",
    "python3-prometheus-client",
    "python3-sdnotify",
}
# Where systemd allocates DynamicUser= uids.
DYNAMIC_UIDS = (61184, 65519)
# Capability bit numbers (linux/capability.h).
CAP_NET_BIND_SERVICE = 10

# Sends one datagram and prints the reply, retrying (bounded) while nothing answers yet.
SEND = """
import socket, sys, time
host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
deadline = time.monotonic() + float(sys.argv[4])
while True:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        sock.connect((host, port))
        try:
            sock.send(payload)
            sys.stdout.write(sock.recv(65536).decode())
            break
        except (TimeoutError, ConnectionRefusedError) as error:
            if time.monotonic() > deadline:
                sys.exit(f"no reply from {host}:{port}: {error!r}")
    time.sleep(0.1)
"""

# Sends exactly one datagram and prints the reply, waiting up to argv[4] seconds for it.
SEND_ONCE = """
import socket, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.settimeout(float(sys.argv[4]))
    sock.connect((host, port))
    sock.send(payload)
    try:
        sys.stdout.write(sock.recv(65536).decode())
    except (TimeoutError, ConnectionRefusedError) as error:
        sys.exit(f"no reply from {host}:{port}: {error!r}")
"""

# Prints how many UDP sockets are bound to port argv[1] and whether process argv[2] holds
# every one of them (udpbindd.host reads sock_diag, or /proc/net/udp).
HELD_BY = """
import os, sys
from udpbindd.host import held_sockets
port, pid = int(sys.argv[1]), sys.argv[2]
held = [h for h in held_sockets(owners=False) if h.name.port == port]
fds = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
print(len(held), all(f"socket:[{h.inode}]" in fds for h in held))
"""

container = pytest.mark.container


# -- building ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("dpkg-buildpackage")
    require_tool("dpkg-deb")
    # build-deb installs missing build dependencies itself, which takes root.
    require(
        os.geteuid() == 0 or shutil.which("dh") is not None,
        "building the package needs debhelper, or root to install it",
    )
    outdir = tmp_path_factory.mktemp("deb")
    done = subprocess.run(
        [str(REPO / "packaging" / "build-deb"), str(outdir)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    path = Path(done.stdout.strip().splitlines()[-1])
    assert re.fullmatch(r"udpbindd_[0-9][^_]*_all\.deb", path.name), path
    assert path.parent == outdir
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unpacked")
    subprocess.run(["dpkg-deb", "--extract", str(deb), str(root)], check=True, timeout=60)
    subprocess.run(["dpkg-deb", "--control", str(deb), str(root / "DEBIAN")], check=True)
    return root


def field(control: str, name: str) -> str:
    found = re.search(rf"^{name}: (.*(?:\n .*)*)", control, re.MULTILINE)
    assert found is not None, f"no {name} in:\n{control}"
    return found.group(1)


def test_package_holds_the_command_the_unit_and_the_conffile(unpacked: Path) -> None:
    command = unpacked / "usr/bin/udpbindd"
    assert command.is_file()
    assert os.access(command, os.X_OK)
    # Debian's python3, never a virtualenv's or the build machine's pyenv.
    assert command.read_text().splitlines()[0] == "#!/usr/bin/python3"
    assert (unpacked / "usr/lib/python3/dist-packages/udpbindd/default.yaml").is_file()

    unit = unpacked / "lib/systemd/system" / UNIT
    assert unit.read_text() == (REPO / "systemd" / UNIT).read_text()

    conffiles = (unpacked / "DEBIAN/conffiles").read_text().split()
    assert CONFFILE in conffiles
    assert (unpacked / CONFFILE.lstrip("/")).is_file()

    for name in ("udpbindd.socket", "udpbindd-activated.service", "udpbindd.example.yaml"):
        assert (unpacked / EXAMPLES.lstrip("/") / name).is_file(), name


def test_package_depends_on_debians_python_libraries(unpacked: Path) -> None:
    control = (unpacked / "DEBIAN/control").read_text()
    assert field(control, "Architecture") == "all"
    depends = {
        re.split(r"[\s(:]", alternative.strip())[0]
        for clause in field(control, "Depends").split(",")
        for alternative in clause.split("|")
    }
    assert depends >= PYTHON_DEPENDS | {"procps"}, depends


def test_conffile_is_the_embedded_default(unpacked: Path) -> None:
    installed = load(unpacked / CONFFILE.lstrip("/"))
    default = load_default()
    # Only the line numbers may differ: the conffile has a header of its own.
    assert [replace(item, line=0) for item in installed.listeners] == [
        replace(item, line=0) for item in default.listeners
    ]
    assert installed.metrics == default.metrics
    assert [
        (str(item.interface), item.port, item.responder.value) for item in installed.listeners
    ] == [("127.0.0.1", 1060, "size")]


# -- in a container ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rootfs() -> Path:
    require_container()
    return ensure_rootfs()


def install(box: Container, deb: Path) -> None:
    # apt rather than dpkg: it refuses a package whose dependencies are not satisfied. They
    # are preinstalled in the rootfs, so nothing is downloaded.
    box.run(
        "apt-get", "install", "--yes", "--no-install-recommends", f"{DEB_MOUNT}/{deb.name}",
        timeout=120,
    )  # fmt: skip


@pytest.fixture
def fresh(rootfs: Path, deb: Path) -> Iterator[Callable[[], Container]]:
    """Boots a container of its own, with the package installed, for a test that changes it."""
    boxes: list[Container] = []

    def boot() -> Container:
        box = Container(rootfs, bind_ro={deb.parent: DEB_MOUNT})
        boxes.append(box)
        box.start()
        install(box, deb)
        return box

    yield boot
    for box in boxes:
        box.stop()


@pytest.fixture(scope="module")
def installed(rootfs: Path, deb: Path) -> Iterator[Container]:
    """One container with the package installed, shared by the tests that only look."""
    with Container(rootfs, bind_ro={deb.parent: DEB_MOUNT}) as box:
        install(box, deb)
        yield box


def send(box: Container, port: int, payload: str, timeout: float = 10.0) -> str:
    done = box.run("python3", "-c", SEND, "127.0.0.1", str(port), payload, str(timeout))
    return done.stdout


def send_once(
    box: Container, port: int, payload: str, wait: float = 2.0
) -> subprocess.CompletedProcess[str]:
    """One datagram, no retry: for the moments when the listener must answer right now."""
    return box.run(
        "python3", "-c", SEND_ONCE, "127.0.0.1", str(port), payload, str(wait), check=False
    )


def metrics_answer(box: Container, port: int = 9917) -> bool:
    url = f"http://127.0.0.1:{port}/metrics"
    fetch = f"import urllib.request; urllib.request.urlopen({url!r}, timeout=5)"
    return box.run("python3", "-c", fetch, check=False).returncode == 0


def json_events(journal: str, name: str) -> list[dict[str, object]]:
    """The daemon's JSON log records in ``journal`` whose event is ``name``."""
    found = []
    for line in journal.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == name:
            found.append(record)
    return found


def process_status(box: Container, pid: str) -> dict[str, str]:
    """/proc/PID/status of a process in the container (pids are the container's)."""
    text = box.run("cat", f"/proc/{pid}/status").stdout
    return {
        key: value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())
    }


def udpbindd_processes(box: Container) -> str:
    done = box.run("pgrep", "--list-full", "--full", "udpbindd", check=False)
    assert done.returncode in (0, 1), done.stderr
    return done.stdout


@container
def test_install_enables_and_starts_the_unit(installed: Container) -> None:
    state = installed.show(
        UNIT, "UnitFileState", "ActiveState", "SubState", "FragmentPath", "ExecStartPre"
    )
    assert state["UnitFileState"] == "enabled"
    assert (state["ActiveState"], state["SubState"]) == ("active", "running")
    assert state["FragmentPath"] == f"/lib/systemd/system/{UNIT}"
    # Its failure would not stop the start ("-"), so make sure it really ran and passed.
    assert re.search(r"code=exited ; status=0\b", state["ExecStartPre"]), state["ExecStartPre"]


@container
def test_status_shows_the_daemons_status_text(installed: Container) -> None:
    text = installed.show(UNIT, "StatusText")["StatusText"]
    assert re.search(r"\b1 bound\b", text), text
    status = installed.systemctl("status", "--no-pager", UNIT).stdout
    assert f'Status: "{text}"' in status, status


@container
def test_default_listener_answers_with_the_size(installed: Container) -> None:
    assert send(installed, 1060, "x" * 42) == "Your data was 42 bytes"
    probe = installed.run("udpbindd", "probe", "127.0.0.1", "1060", "--message", "hello")
    assert "Your data was 5 bytes" in probe.stdout, probe.stdout + probe.stderr


@container
def test_daemon_runs_unprivileged_with_only_net_bind_service(installed: Container) -> None:
    state = installed.show(UNIT, "MainPID", "User")
    assert state["User"] == "udpbindd"
    status = process_status(installed, state["MainPID"])
    uids = status["Uid"].split()
    assert len(uids) == 4
    assert "0" not in uids, status["Uid"]
    assert "0" not in status["Gid"].split(), status["Gid"]
    only_bind = 1 << CAP_NET_BIND_SERVICE
    for kind in ("CapEff", "CapPrm", "CapAmb", "CapBnd"):
        assert int(status[kind], 16) == only_bind, (kind, status[kind])
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # filter mode: SystemCallFilter= is in force


@container
def test_unit_is_activating_until_ready_and_active_once_the_listener_answers(
    fresh: Callable[[], Container],
) -> None:
    box = fresh()
    box.systemctl("stop", UNIT)
    config = box.run("cat", CONFFILE).stdout
    # The configuration becomes a FIFO: `udpbindd run` cannot bind anything, nor send READY=1,
    # before it has read its file, and a FIFO delivers the file only when the test writes it.
    box.run("rm", CONFFILE)
    box.run("mkfifo", "--mode=0644", CONFFILE)

    def feed() -> None:
        # `cat` blocks until a reader opens the FIFO; its EOF ends the reader's read.
        box.run("sh", "-c", f"cat > {CONFFILE}", input=config, timeout=30)

    with ThreadPoolExecutor(max_workers=1) as pool:
        # `systemctl start` waits for the start job: until READY=1 (or a failure).
        start = pool.submit(box.systemctl, "start", UNIT, check=False)
        feed()  # read by ExecStartPre=udpbindd check
        waiting = box.wait_for(
            "the main process, waiting for its configuration",
            lambda: (
                state
                if (state := box.show(UNIT, "ActiveState", "SubState", "MainPID"))["SubState"]
                == "start"
                and state["MainPID"] != "0"
                else None
            ),
        )
        assert waiting["ActiveState"] == "activating"
        # The process exists but has bound nothing: activating is the truth, not a delay.
        refused = send_once(box, 1060, "too early", wait=0.5)
        assert "ConnectionRefusedError" in refused.stderr, refused.stdout + refused.stderr
        assert not metrics_answer(box)
        assert not start.done()
        fed_at = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        feed()  # read by the main process, which then binds and sends READY=1
        done = start.result(timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    # `start` has returned, so READY=1 has arrived: the listener answers the first datagram
    # and the metrics are served, with no retry.
    answer = send_once(box, 1060, "x" * 7)
    assert answer.stdout == "Your data was 7 bytes", answer.stderr
    assert metrics_answer(box)
    state = box.show(
        UNIT, "ActiveState", "SubState", "MainPID", "ActiveEnterTimestampMonotonic", "NRestarts"
    )
    assert (state["ActiveState"], state["SubState"]) == ("active", "running")
    assert (state["MainPID"], state["NRestarts"]) == (waiting["MainPID"], "0")
    # The container shares the host's CLOCK_MONOTONIC: active only after the file was fed.
    assert int(state["ActiveEnterTimestampMonotonic"]) > fed_at


@container
def test_reload_binds_a_new_privileged_listener_in_the_same_unprivileged_process(
    fresh: Callable[[], Container],
) -> None:
    box = fresh()
    before = box.show(UNIT, "MainPID", "StatusText")
    assert before["StatusText"] == "1 bound, 0 waiting, 0 failed"
    assert send_once(box, 999, "too early", wait=0.5).returncode != 0
    box.write_file(
        CONFFILE,
        "listeners:\n"
        "  - {name: classic, interface: 127.0.0.1, port: 1060, responder: size}\n"
        "  - {name: low, interface: 127.0.0.1, port: 999, responder: echo}\n"
        "metrics:\n  listen: ['127.0.0.1:9917']\n",
    )
    box.systemctl("reload", UNIT)
    # ExecReload= only delivers SIGHUP: the daemon applies the file in its loop, then says so.
    box.wait_for(
        "reload_finished in the journal",
        lambda: json_events(box.journal(UNIT), "reload_finished"),
    )
    assert send(box, 999, "below 1024") == "below 1024"
    assert send(box, 1060, "again") == "Your data was 5 bytes"
    after = box.show(UNIT, "MainPID", "NRestarts", "ActiveState", "StatusText")
    assert after == {
        "MainPID": before["MainPID"],
        "NRestarts": "0",
        "ActiveState": "active",
        "StatusText": "2 bound, 0 waiting, 0 failed",
    }
    # The process that bound port 999 is not root: CAP_NET_BIND_SERVICE is all it has.
    # (ps shows the number: the container's nsswitch.conf has no nss-systemd for the name.)
    uid = int(box.run("ps", "-o", "uid=", "-p", after["MainPID"]).stdout)
    assert DYNAMIC_UIDS[0] <= uid <= DYNAMIC_UIDS[1], uid
    assert process_status(box, after["MainPID"])["Uid"].split() == [str(uid)] * 4


@container
def test_watchdog_keeps_a_pinging_daemon_and_restarts_a_stuck_one(
    fresh: Callable[[], Container],
) -> None:
    box = fresh()
    box.write_file(f"/run/systemd/system/{UNIT}.d/watchdog.conf", "[Service]\nWatchdogSec=2s\n")
    box.systemctl("daemon-reload")
    box.systemctl("restart", UNIT)
    first = box.show(UNIT, "MainPID", "WatchdogUSec")
    assert first["WatchdogUSec"] == "2s"
    # A fixed window of 2.5 watchdog periods with the loop idle: only its own pings keep it
    # alive, and a missed one would show as a restart.
    time.sleep(5)
    assert box.show(UNIT, "MainPID", "NRestarts") == {"MainPID": first["MainPID"], "NRestarts": "0"}

    # A stopped process sends nothing: systemd must kill it and start another.
    box.run("kill", "-STOP", first["MainPID"])
    box.wait_for(
        "a restart after the watchdog timeout",
        lambda: box.show(UNIT, "NRestarts")["NRestarts"] == "1",
        timeout=20,
    )
    box.wait_for(
        "the restarted unit", lambda: box.show(UNIT, "ActiveState")["ActiveState"] == "active"
    )
    assert box.show(UNIT, "MainPID")["MainPID"] != first["MainPID"]
    assert "Watchdog timeout" in box.journal(UNIT)
    assert send_once(box, 1060, "back").stdout == "Your data was 4 bytes"


@container
def test_invalid_config_fails_the_unit_without_a_restart_loop(
    fresh: Callable[[], Container],
) -> None:
    box = fresh()
    box.write_file(CONFFILE, "listeners:\n  - interface: 127.0.0.1\n    port: 70000\n")
    done = box.systemctl("restart", UNIT, check=False)
    assert done.returncode != 0
    state = box.show(UNIT, "ActiveState", "SubState", "Result", "ExecMainStatus", "NRestarts")
    # "failed", not "auto-restart": systemd has already decided not to restart it.
    assert state == {
        "ActiveState": "failed",
        "SubState": "failed",
        "Result": "exit-code",
        "ExecMainStatus": "78",
        "NRestarts": "0",
    }
    assert "70000 is not in 1..65535" in box.journal(UNIT)


@container
def test_socket_activation_example_serves_a_privileged_port_without_capabilities(
    fresh: Callable[[], Container],
) -> None:
    box = fresh()
    for name in ("udpbindd.socket", "udpbindd-activated.service"):
        box.run("cp", f"{EXAMPLES}/{name}", f"/etc/systemd/system/{name}")
    box.write_file(
        CONFFILE,
        "listeners:\n"
        "  - name: echo\n    interface: 127.0.0.1\n    port: 7\n    responder: echo\n"
        "metrics:\n  listen: []\n",
    )
    box.systemctl("disable", "--now", UNIT)
    box.systemctl("daemon-reload")
    box.systemctl("enable", "--now", "udpbindd.socket")

    # systemd holds the socket now. The first datagram starts the service, which must answer
    # that very datagram (one send, no retry) on the socket it is given.
    done = send_once(box, 7, "hello, port 7", wait=20)
    journal = box.journal("udpbindd-activated.service")
    assert done.stdout == "hello, port 7", f"{done.stderr}\njournal:\n{journal}"
    state = box.show("udpbindd-activated.service", "ActiveState", "MainPID", "NRestarts")
    assert (state["ActiveState"], state["NRestarts"]) == ("active", "0")
    [inherited] = json_events(journal, "listener_inherited")
    assert (inherited["listener"], inherited["fdname"], inherited["matched_by"]) == (
        "echo",
        "echo",
        "name",
    )
    assert json_events(journal, "inherited_unmatched") == []
    # One socket on port 7, systemd's, held by the daemon too: it bound no other.
    held = box.run("python3", "-c", HELD_BY, "7", state["MainPID"]).stdout.split()
    assert held == ["1", "True"]
    status = process_status(box, state["MainPID"])
    for kind in ("CapEff", "CapPrm", "CapAmb", "CapBnd"):
        assert int(status[kind], 16) == 0, (kind, status[kind])
    assert "0" not in status["Uid"].split()


@container
def test_remove_stops_the_service_and_purge_deletes_the_conffile(
    fresh: Callable[[], Container],
) -> None:
    box = fresh()
    assert udpbindd_processes(box)
    box.run("dpkg", "--remove", "udpbindd")
    assert udpbindd_processes(box) == ""
    assert box.show(UNIT, "ActiveState")["ActiveState"] == "inactive"
    # A removed package keeps its configuration until it is purged.
    box.run("test", "-f", CONFFILE)
    box.run("dpkg", "--purge", "udpbindd")
    assert box.run("test", "-e", "/etc/udpbindd", check=False).returncode == 1
    assert udpbindd_processes(box) == ""


@container
def test_stop_then_purge_leaves_nothing_running(fresh: Callable[[], Container]) -> None:
    box = fresh()
    box.systemctl("stop", UNIT)
    box.run("dpkg", "--purge", "udpbindd")
    assert udpbindd_processes(box) == ""
    state = box.show(UNIT, "LoadState", "ActiveState", "UnitFileState")
    assert state["LoadState"] == "not-found"
    assert state["ActiveState"] == "inactive"
    assert box.run("test", "-e", "/etc/udpbindd", check=False).returncode == 1
    assert box.run("test", "-e", "/usr/bin/udpbindd", check=False).returncode == 1
