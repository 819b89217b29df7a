"""``udpbindd check``: the table, every clash, text and JSON, and the exit codes 0/1/2/78.

Most cases call ``cli.main`` in-process; a few run ``python -m udpbindd`` in a subprocess to
prove the real exit status and that no input ever produces a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import require, run_as_nobody

from udpbindd import cli
from udpbindd.config import DEFAULT_PATH

REPO = Path(__file__).parent.parent
TESTDATA = Path(__file__).parent / "testdata"
EXAMPLE = REPO / "config" / "udpbindd.example.yaml"
ROW_FIELDS = {
    "listener", "socket", "address", "port", "family", "v6only", "device", "responder",
    "reuse_port", "freebind", "required", "state",
}  # fmt: skip
CLASH_FIELDS = {"listener", "socket", "with", "overlap", "certain", "message", "why", "fix"}

WriteConfig = Callable[[str], Path]


def run_check(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = cli.main(["check", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def run_module(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m udpbindd ARGS`` in a fresh interpreter."""
    return _run([sys.executable, "-m", "udpbindd", *map(str, args)])


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=REPO)


def this_command() -> str:
    """This process's name as the survey reports it (/proc/PID/comm)."""
    return Path("/proc/self/comm").read_text().rstrip("\n")


@pytest.fixture
def held_socket(free_udp_port: int) -> Iterator[socket.socket]:
    """A UDP socket this test process holds on 127.0.0.1 (port free on every family)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", free_udp_port))
        yield sock


# ---------------------------------------------------------------------------------------------
# clean files: exit 0


def test_clean_file_prints_the_table(
    capsys: pytest.CaptureFixture[str], write_config: WriteConfig
) -> None:
    path = write_config(
        "listeners:\n"
        "  - {name: classic, interface: 127.0.0.1, port: 1060}\n"
        '  - {interface: "::1", port: 1060, responder: echo, device: lo}\n'
        '  - {interface: "*", port: 1062, family: dual, responder: discard}\n'
        '  - {interface: "*", port: 1063}\n'
        '  - {name: spare, interface: "*", port: 1060, enabled: false}\n'
    )
    code, out, err = run_check(capsys, "--no-host", "-c", path)
    assert (code, err) == (0, "")
    assert out == (
        f"{path}: 5 socket name(s)\n"
        "LISTENER       SOCKET          FAMILY  DEVICE  RESPONDER  STATE\n"
        "classic        127.0.0.1:1060  ipv4    -       size       ok\n"
        "[::1]:1060%lo  [::1]:1060%lo   ipv6    lo      echo       ok\n"
        "*:1062/dual    [::]:1062       dual    -       discard    ok\n"
        "*:1063         0.0.0.0:1063    ipv4    -       size       ok\n"
        "*:1063         [::]:1063       ipv6    -       size       ok\n"
        "\n"
        "note: sockets held by other processes were not checked (--no-host)\n"
        "\n"
        "ok: no clashes\n"
    )


def test_clean_file_as_json(capsys: pytest.CaptureFixture[str], write_config: WriteConfig) -> None:
    path = write_config(
        'listeners:\n  - {name: w, interface: "*", port: 1063, reuse_port: true, required: false}\n'
    )
    code, out, _ = run_check(capsys, "--no-host", "--format", "json", "-c", path)
    assert code == 0
    document = json.loads(out)
    assert document["source"] == str(path)
    assert (document["ok"], document["host_checked"]) == (True, False)
    assert document["clashes"] == []
    assert document["unresolved"] == []
    assert document["bindings"] == [
        {
            "listener": "w",
            "socket": "0.0.0.0:1063",
            "address": "0.0.0.0",
            "port": 1063,
            "family": "ipv4",
            "v6only": None,
            "device": None,
            "responder": "size",
            "reuse_port": True,
            "freebind": False,
            "required": False,
            "state": "ok",
        },
        {
            "listener": "w",
            "socket": "[::]:1063",
            "address": "::",
            "port": 1063,
            "family": "ipv6",
            "v6only": True,
            "device": None,
            "responder": "size",
            "reuse_port": True,
            "freebind": False,
            "required": False,
            "state": "ok",
        },
    ]


def test_example_file_checks_clean(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_check(capsys, "--no-host", "-c", EXAMPLE)
    assert (code, err) == (0, "")
    assert out.endswith("ok: no clashes\n")


def test_example_file_checks_clean_from_the_command_line() -> None:
    result = run_module("check", "--no-host", "-c", "config/udpbindd.example.yaml")
    assert (result.returncode, result.stderr) == (0, "")
    assert "classic   127.0.0.1:1060" in result.stdout


def test_good_testdata_files_check_clean(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("good.yaml", "good-merge.yaml"):
        code, out, err = run_check(capsys, "--no-host", "-c", TESTDATA / name)
        assert (code, err) == (0, ""), name
        assert out.endswith("ok: no clashes\n"), name


def test_without_a_file_the_embedded_default_is_checked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    require(not DEFAULT_PATH.exists(), f"{DEFAULT_PATH} exists, so it would be read instead")
    code, out, err = run_check(capsys, "--no-host", "--format", "json")
    assert (code, err) == (0, "")
    document = json.loads(out)
    assert document["source"] == "<embedded default>"
    assert [(row["listener"], row["socket"], row["responder"]) for row in document["bindings"]] == [
        ("classic", "127.0.0.1:1060", "size")
    ]


# ---------------------------------------------------------------------------------------------
# clashes: exit 1


def test_clash_between_two_listeners(
    capsys: pytest.CaptureFixture[str], write_config: WriteConfig
) -> None:
    path = write_config(
        "listeners:\n"
        "  - {name: one, interface: 127.0.0.1, port: 1060}\n"
        '  - {name: all, interface: "*", port: 1060, family: ipv4}\n'
    )
    code, out, err = run_check(capsys, "--no-host", "-c", path)
    assert (code, err) == (1, "")
    assert out.startswith(
        f"{path}: 2 socket name(s)\n"
        "LISTENER  SOCKET          FAMILY  DEVICE  RESPONDER  STATE\n"
        "one       127.0.0.1:1060  ipv4    -       size       ok\n"
        "all       0.0.0.0:1060    ipv4    -       size       clash\n"
    )
    assert (
        "\nclash: listener 'all' (0.0.0.0:1060) clashes with listener 'one' (127.0.0.1:1060)\n"
        "  why: 0.0.0.0:1060 receives on every IPv4 address, including 127.0.0.1; "
        "neither is bound to a device; "
        "reuse_port would let them share the port only if both set it\n"
        "  fix: list the specific addresses instead of the wildcard, bind the two to "
        "different devices, or use another port\n"
    ) in out
    assert out.endswith("\n1 clash(es) found\n")


def test_clash_between_two_listeners_as_json(
    capsys: pytest.CaptureFixture[str], write_config: WriteConfig
) -> None:
    path = write_config(
        "listeners:\n"
        "  - {name: one, interface: 127.0.0.1, port: 1060}\n"
        '  - {name: all, interface: "*", port: 1060, family: ipv4}\n'
    )
    code, out, _ = run_check(capsys, "--no-host", "--format", "json", "-c", path)
    assert code == 1
    document = json.loads(out)
    assert document["ok"] is False
    assert all(set(row) == ROW_FIELDS for row in document["bindings"])
    assert [(row["listener"], row["state"]) for row in document["bindings"]] == [
        ("one", "ok"),
        ("all", "clash"),
    ]
    (clash,) = document["clashes"]
    assert set(clash) == CLASH_FIELDS
    assert clash["listener"] == "all"
    assert clash["socket"] == "0.0.0.0:1060"
    assert clash["with"] == {"kind": "listener", "listener": "one", "socket": "127.0.0.1:1060"}
    assert (clash["overlap"], clash["certain"]) == ("new_covers", True)
    assert clash["message"] == (
        "listener 'all' (0.0.0.0:1060) clashes with listener 'one' (127.0.0.1:1060)"
    )


def test_required_listener_without_an_interface_waits(
    capsys: pytest.CaptureFixture[str], write_config: WriteConfig
) -> None:
    # run would wait for the interface (up to bind_timeout), so check does not fail.
    path = write_config("listeners:\n  - {name: x, interface: udpbd-none0, port: 1060}\n")
    code, out, _ = run_check(capsys, "--no-host", "-c", path)
    assert code == 0
    assert (
        "waiting: listener 'x' (udpbd-none0 port 1060): interface udpbd-none0 does not exist; "
        "bound when it appears; start-up waits for it up to 90 s\n"
    ) in out
    assert out.endswith("\nok: no clashes; 1 socket(s) waiting for an address or interface\n")
    code, out, _ = run_check(capsys, "--no-host", "--format", "json", "-c", path)
    assert code == 0
    document = json.loads(out)
    assert document["unresolved"] == [
        {"listener": "x", "required": True, "reason": "interface udpbd-none0 does not exist"}
    ]
    assert document["waiting"] == [
        {
            "listener": "x",
            "socket": "udpbd-none0 port 1060",
            "required": True,
            "bind_timeout": 90.0,
            "reason": "interface udpbd-none0 does not exist",
        }
    ]


def test_required_listener_that_may_not_wait_fails(
    capsys: pytest.CaptureFixture[str], write_config: WriteConfig
) -> None:
    path = write_config(
        "listeners:\n  - {name: x, interface: udpbd-none0, port: 1060, bind_timeout: 0}\n"
    )
    code, out, _ = run_check(capsys, "--no-host", "-c", path)
    assert code == 1
    assert "required with bind_timeout 0: run would fail at once\n" in out
    assert out.endswith(
        "\n1 required listener(s) absent, with bind_timeout 0; "
        "1 socket(s) waiting for an address or interface\n"
    )


def test_optional_listener_without_an_interface_is_a_warning(
    capsys: pytest.CaptureFixture[str], write_config: WriteConfig
) -> None:
    path = write_config(
        "listeners:\n  - {name: x, interface: udpbd-none0, port: 1060, required: false}\n"
    )
    code, out, _ = run_check(capsys, "--no-host", "-c", path)
    assert code == 0
    assert (
        "waiting: listener 'x' (udpbd-none0 port 1060): interface udpbd-none0 does not exist; "
        "bound when it appears (not required: start-up does not wait)\n"
    ) in out


def test_an_address_no_interface_has_is_waiting(
    capsys: pytest.CaptureFixture[str], write_config: WriteConfig
) -> None:
    # 198.51.100.0/24 is TEST-NET-2: on no interface of a test host.
    path = write_config(
        "listeners:\n"
        "  - {name: later, interface: 198.51.100.77, port: 1060}\n"
        "  - {name: now, interface: 127.0.0.1, port: 1060}\n"
        "  - {name: free, interface: 198.51.100.78, port: 1060, freebind: true}\n"
    )
    code, out, _ = run_check(capsys, "--no-host", "-c", path)
    assert code == 0
    table = [line.split() for line in out.splitlines()[1:5]]
    assert [(row[0], row[-1]) for row in table] == [
        ("LISTENER", "STATE"),
        ("later", "waiting"),
        ("now", "ok"),
        ("free", "ok"),  # freebind binds without the address
    ]
    assert (
        "waiting: listener 'later' (198.51.100.77:1060): "
        "no interface has the address 198.51.100.77; "
        "bound when it appears; start-up waits for it up to 90 s\n"
    ) in out
    code, out, _ = run_check(capsys, "--no-host", "--format", "json", "-c", path)
    document = json.loads(out)
    assert [row["state"] for row in document["bindings"]] == ["waiting", "ok", "ok"]
    assert document["waiting"][0]["socket"] == "198.51.100.77:1060"


def test_clash_with_a_socket_this_process_holds(
    capsys: pytest.CaptureFixture[str], write_config: WriteConfig, held_socket: socket.socket
) -> None:
    port = held_socket.getsockname()[1]
    path = write_config(f"listeners:\n  - {{name: wild, interface: 0.0.0.0, port: {port}}}\n")
    code, out, err = run_check(capsys, "-c", path)
    assert (code, err) == (1, "")
    holder = f"pid {os.getpid()} ({this_command()})"
    assert (
        f"clash: listener 'wild' (0.0.0.0:{port}) clashes with 127.0.0.1:{port} held by {holder}\n"
    ) in out
    assert f"  fix: stop {holder}, or move listener 'wild' to another port or address\n" in out

    code, out, _ = run_check(capsys, "--format", "json", "-c", path)
    assert code == 1
    (clash,) = json.loads(out)["clashes"]
    assert clash["with"] == {
        "kind": "process",
        "socket": f"127.0.0.1:{port}",
        "pid": os.getpid(),
        "command": this_command(),
        "uid": os.geteuid(),
        "inode": os.fstat(held_socket.fileno()).st_ino,
    }

    # --no-host leaves other processes' sockets out of it.
    code, out, _ = run_check(capsys, "--no-host", "-c", path)
    assert code == 0
    assert out.endswith("ok: no clashes\n")


def test_clash_with_this_process_from_a_subprocess(
    write_config: WriteConfig, held_socket: socket.socket
) -> None:
    port = held_socket.getsockname()[1]
    path = write_config(f"listeners:\n  - {{name: wild, interface: 0.0.0.0, port: {port}}}\n")
    result = run_module("check", "-c", path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"held by pid {os.getpid()} ({this_command()})" in result.stdout
    result = run_module("check", "--no-host", "-c", path)
    assert (result.returncode, result.stderr) == (0, "")


# ---------------------------------------------------------------------------------------------
# invalid files: exit 78


def test_invalid_file_lists_every_problem(capsys: pytest.CaptureFixture[str]) -> None:
    path = TESTDATA / "bad-many.yaml"
    code, out, err = run_check(capsys, "-c", path)
    assert (code, out) == (78, "")
    lines = err.splitlines()
    assert len(lines) == 11
    assert lines[0] == f"{path}:5: listeners[0].port: 0 is not in 1..65535"
    assert lines[-2] == (
        f"{path}:21: logging.level: 'loud' is not one of: debug, info, warning, error"
    )
    assert lines[-1] == "udpbindd: invalid configuration (10 problem(s))"


def test_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    code, out, err = run_check(capsys, "-c", path)
    assert (code, out) == (78, "")
    assert err == f"{path}: no such file\nudpbindd: invalid configuration (1 problem(s))\n"


# ---------------------------------------------------------------------------------------------
# usage: exit 2


@pytest.mark.parametrize(
    "argv",
    [["check", "--format", "xml"], ["check", "--bogus"], ["frobnicate"], []],
    ids=["bad-format", "bad-option", "bad-command", "no-command"],
)
def test_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: udpbindd")


# ---------------------------------------------------------------------------------------------
# real processes: the exit status and never a traceback


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Each kind of unusable file, with the first line ``check`` must print for it."""
    cases: dict[str, bytes | None] = {
        "missing": None,
        "empty": b"",
        "comments": b"# nothing here\n\n",
        "binary": bytes(range(256)),
        "latin1": b"listeners:\n  - name: caf\xe9\n",
        "not-a-mapping": b"- 1\n- 2\n",
        "scalar": b"just text\n",
        "syntax": b"listeners: [\n",
        "two-documents": b"listeners: []\n---\nlisteners: []\n",
        "unquoted-star": b"listeners:\n  - interface: *\n    port: 1\n",
        "bad-int-tag": b"listeners:\n  - {interface: 127.0.0.1, port: !!int x}\n",
        "alias-loop": b"listeners: &l\n  - *l\n",
        "deep": b"listeners: " + b"[" * 5000 + b"]" * 5000 + b"\n",
    }
    first_lines = {
        "missing": "no such file",
        "empty": "empty file: expected a mapping with 'listeners'",
        "comments": "empty file: expected a mapping with 'listeners'",
        "binary": "binary data, not a YAML text file",
        "latin1": ":2: not valid UTF-8 text",
        "not-a-mapping": ":1: (top level): expected a mapping, got a list",
        "scalar": ":1: (top level): expected a mapping, got a string ('just text')",
        "syntax": ":2: invalid YAML: expected the node content, but found '<stream end>' "
        "(while parsing a flow node on line 2)",
        "two-documents": ":2: invalid YAML: a second document starts here (---); "
        "the file must hold exactly one",
        "unquoted-star": ":2: invalid YAML: "
        'a bare * starts a YAML alias; quote the wildcard as "*"',
        "bad-int-tag": ":2: listeners[0].port: 'x' is not a valid !!int",
        "alias-loop": ":1: listeners[0]: an alias refers to a value that contains it",
        "deep": "invalid YAML: nested too deeply",
    }
    result: dict[str, tuple[Path, str]] = {}
    for name, data in cases.items():
        path = tmp_path / f"{name}.yaml"
        if data is not None:
            path.write_bytes(data)
        line = first_lines[name]
        result[name] = (path, f"{path}{line}" if line.startswith(":") else f"{path}: {line}")
    result["directory"] = (tmp_path, f"{tmp_path}: is a directory, not a file")
    return result


def test_every_bad_input_exits_78_without_a_traceback(tmp_path: Path) -> None:
    for name, (path, first_line) in _bad_inputs(tmp_path).items():
        result = run_module("check", "--no-host", "-c", path)
        assert result.returncode == 78, (name, result.stderr)
        assert result.stdout == "", name
        assert "Traceback" not in result.stderr, name
        assert result.stderr.splitlines()[0] == first_line, name


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("check", "--no-host", "-c", "tests/testdata/good.yaml"), 0),
        (("check", "--no-host", "--format", "json", "-c", "tests/testdata/good.yaml"), 0),
        (("check", "-c", "tests/testdata/bad-port-range.yaml"), 78),
        (("check", "--format", "yaml"), 2),
        (("--version",), 0),
    ],
)
def test_exit_status_of_the_process(args: tuple[str, ...], code: int) -> None:
    result = run_module(*args)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr


def test_internal_clash_exit_status_of_the_process(write_config: WriteConfig) -> None:
    path = write_config(
        "listeners:\n"
        "  - {name: one, interface: 127.0.0.1, port: 1060}\n"
        "  - {name: two, interface: 127.0.0.1, port: 1060, responder: echo}\n"
    )
    result = run_module("check", "--no-host", "--format", "json", "-c", path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (clash,) = json.loads(result.stdout)["clashes"]
    assert (clash["listener"], clash["with"]["listener"], clash["overlap"]) == (
        "two",
        "one",
        "same",
    )


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory the user nobody may enter (pytest's own tmp_path is private to root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as nobody")
    path = Path(tempfile.mkdtemp(prefix="udpbindd-nobody-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path)


def test_unreadable_file_as_nobody(nobody_dir: Path) -> None:
    readable = nobody_dir / "readable.yaml"
    readable.write_text("listeners:\n  - {interface: 127.0.0.1, port: 1060}\n")
    readable.chmod(0o644)
    # The control proves the process really runs as nobody, and reaches the directory.
    control = run_as_nobody("check", "--no-host", "--format", "json", "-c", readable, cwd=REPO)
    assert (control.returncode, control.stderr) == (0, "")
    assert json.loads(control.stdout)["source"] == str(readable)

    secret = nobody_dir / "secret.yaml"
    secret.write_text("listeners:\n  - {interface: 127.0.0.1, port: 1060}\n")
    secret.chmod(0)
    result = run_as_nobody("check", "--no-host", "-c", secret, cwd=REPO)
    assert result.returncode == 78
    assert "Traceback" not in result.stderr
    assert result.stderr == (
        f"{secret}: permission denied\nudpbindd: invalid configuration (1 problem(s))\n"
    )
