"""A real systemd as PID 1 of a systemd-nspawn container, for tests of units and packages.

This is a helper module, not a test file. The root filesystem is built once with debootstrap
and cached; each container boots it with ``--volatile=overlay``, so whatever a test changes
lives in a tmpfs and vanishes at power-off. Every wait is bounded, and only processes this
module started are ever killed, by pid.

API
---
``require_container()``
    Call first (in a fixture). Skips the test unless running as root with ``debootstrap``,
    ``systemd-nspawn`` and ``nsenter`` installed; fails it instead when the environment
    variable ``CI`` is ``"true"``, so a CI job that lost a component cannot pass by skipping.

``ensure_rootfs(extra=PYTHON_PACKAGES) -> Path``
    The path of a Debian bookworm rootfs (``debootstrap --variant=minbase``) with systemd,
    python3, procps and the ``extra`` packages installed, and the getty units masked. It lives
    in ``ROOTFS_CACHE`` (``/var/tmp/udpbindd-rootfs``, or ``$UDPBINDD_ROOTFS_CACHE``), one
    directory per package set, and is reused when its ``.complete`` stamp exists; otherwise it
    is rebuilt (about a minute). Concurrent callers wait on a lock file rather than build twice.
    The mirror is the one apt uses on the host (override with ``$UDPBINDD_DEBIAN_MIRROR``).

``Container(rootfs, *, bind_ro={}, private_network=True)``
    A context manager: entering boots the container and waits until ``systemctl
    is-system-running --wait`` answers; leaving powers it off. ``bind_ro`` maps host paths to
    paths in the container, mounted read-only (the container's ``/tmp`` is a fresh tmpfs, so
    pass files this way). With ``private_network`` the container has only its own ``lo``;
    without it, it shares the host's network namespace. Attributes: ``leader`` (the host pid of
    the container's PID 1), ``state`` (what is-system-running answered), ``console()`` (what
    nspawn and the container's console printed so far). Methods:

    - ``run(*argv, check=True, timeout=60, input=None)`` runs a command inside (``nsenter``
      into every namespace of PID 1) with a minimal environment and returns the
      ``CompletedProcess`` (text). With ``check`` a non-zero exit raises ``CommandFailed``
      carrying stdout and stderr.
    - ``systemctl(*args, check=True)`` is ``run("systemctl", *args)``.
    - ``show(unit, *properties) -> dict[str, str]`` reads unit properties
      (``systemctl show -p``).
    - ``write_file(path, text)`` writes a file inside, creating its directory.
    - ``journal(unit) -> str`` is the unit's journal, messages only.
    - ``wait_for(what, probe, timeout=30, interval=0.1)`` calls ``probe()`` until it returns
      something truthy and returns that, or raises ``TimeoutError`` naming ``what`` and the
      last value after ``timeout`` seconds.
    - ``stop()`` is what leaving the ``with`` block does: ``systemctl poweroff``, a bounded wait
      for nspawn to exit, then SIGKILL to the nspawn pid (and to the container's PID 1 if it
      outlived nspawn) if that wait runs out.

Example::

    require_container()
    with Container(ensure_rootfs(), bind_ro={deb_dir: "/mnt/debs"}) as box:
        box.run("apt-get", "install", "-y", "/mnt/debs/udpbindd_0.1.0_all.deb")
        assert box.show("udpbindd.service", "ActiveState") == {"ActiveState": "active"}
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import pytest

T = TypeVar("T")

SUITE = "bookworm"
ROOTFS_CACHE = Path(os.environ.get("UDPBINDD_ROOTFS_CACHE", "/var/tmp/udpbindd-rootfs"))
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# systemd as PID 1 and D-Bus for systemctl; procps for /bin/kill (ExecReload=) and pgrep.
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "procps")
# What the udpbindd package depends on, installed up front so tests need no network.
PYTHON_PACKAGES = (
    "python3-yaml",
    "python3-structlog",
    "python3-prometheus-client",
    "python3-sdnotify",
)
# Gettys would fight over the console nspawn passes through; nothing here logs in.
MASKED_UNITS = ("console-getty.service", "getty@tty1.service")
REQUIRED_TOOLS = ("debootstrap", "systemd-nspawn", "nsenter")

# debootstrap takes about a minute on a good mirror; a stalled download must still end, and
# within pytest's per-test timeout, so the error says what hung.
DEBOOTSTRAP_TIMEOUT = 240.0
BOOT_TIMEOUT = 90.0
COMMAND_TIMEOUT = 60.0
POWEROFF_TIMEOUT = 30.0
KILL_TIMEOUT = 10.0
# Commands inside get this environment, not the host's (virtualenvs, pyenv shims, PYTHONPATH).
INNER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "DEBIAN_FRONTEND": "noninteractive",
    "SYSTEMD_PAGER": "",
}

_names = itertools.count(1)


class CommandFailed(RuntimeError):
    """A command inside the container exited non-zero; the message holds its output."""

    def __init__(self, argv: Sequence[str], done: subprocess.CompletedProcess[str]) -> None:
        self.returncode = done.returncode
        self.stdout = done.stdout
        self.stderr = done.stderr
        super().__init__(
            f"{' '.join(argv)} exited {done.returncode}\n"
            f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        )


def _which(name: str) -> str | None:
    # Root's tools live in sbin, which a user's PATH may lack.
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def require_container() -> None:
    """Skip unless root with the container tools; fail instead when ``CI`` is ``"true"``."""
    missing = [name for name in REQUIRED_TOOLS if _which(name) is None]
    if os.geteuid() != 0:
        missing.insert(0, "root")
    if not missing:
        return
    reason = f"container tests need {', '.join(missing)}"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def mirror() -> str:
    """The Debian mirror apt uses on this host (deb822 or one-line sources), or the default."""
    override = os.environ.get("UDPBINDD_DEBIAN_MIRROR")
    if override:
        return override
    candidates: list[str] = []
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                candidates.extend(line.split()[1:])
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[0] == "deb" and not fields[1].startswith("["):
                candidates.append(fields[1])
    # The security archive holds only updates: debootstrap needs the main one.
    for uri in candidates:
        if "security" not in uri:
            return uri
    return DEFAULT_MIRROR


@contextlib.contextmanager
def _locked(path: Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive flock on ``path``, waiting at most ``timeout`` seconds for it."""
    with path.open("a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} stayed locked for {timeout} s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_rootfs(extra: Sequence[str] = PYTHON_PACKAGES) -> Path:
    """Return a complete cached rootfs with ``extra`` installed, building it if needed."""
    packages = sorted({*BASE_PACKAGES, *extra})
    key = hashlib.sha256(" ".join([SUITE, *packages, *MASKED_UNITS]).encode()).hexdigest()[:12]
    ROOTFS_CACHE.mkdir(parents=True, exist_ok=True)
    root = ROOTFS_CACHE / f"{SUITE}-{key}"
    stamp = ROOTFS_CACHE / f"{SUITE}-{key}.complete"
    with _locked(ROOTFS_CACHE / ".lock", DEBOOTSTRAP_TIMEOUT + 60):
        if stamp.exists() and root.is_dir():
            return root
        partial = ROOTFS_CACHE / f"{SUITE}-{key}.partial"
        # Leftovers of an interrupted build: the stamp is written last, so they are incomplete.
        for stale in (partial, root):
            if stale.exists():
                shutil.rmtree(stale)
        source = mirror()
        done = subprocess.run(
            [
                _which("debootstrap") or "debootstrap",
                "--variant=minbase",
                f"--include={','.join(packages)}",
                SUITE,
                str(partial),
                source,
            ],
            capture_output=True,
            text=True,
            timeout=DEBOOTSTRAP_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"debootstrap {SUITE} from {source} failed ({done.returncode}):\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        units = partial / "etc/systemd/system"
        units.mkdir(parents=True, exist_ok=True)
        for unit in MASKED_UNITS:
            (units / unit).unlink(missing_ok=True)
            (units / unit).symlink_to("/dev/null")
        # The downloaded .debs are installed already; they only take space.
        for deb in (partial / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        partial.rename(root)
        stamp.write_text(f"suite {SUITE}\nmirror {source}\npackages {' '.join(packages)}\n")
    return root


def _pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        # The command name in parentheses may contain spaces: the fields follow the last ")".
        fields = stat.rpartition(")")[2].split()
        if fields and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


class Container:
    """A booted systemd-nspawn container. See the module docstring."""

    def __init__(
        self,
        rootfs: Path,
        *,
        bind_ro: Mapping[str | Path, str] | None = None,
        private_network: bool = True,
    ) -> None:
        self.rootfs = rootfs
        self.bind_ro = dict(bind_ro or {})
        self.private_network = private_network
        self.name = f"udpbindd-test-{os.getpid()}-{next(_names)}"
        self.leader = 0
        self.state = ""
        self._leader_ns: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._console = ""

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Container:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Container:
        """Boot the container and wait (bounded) until systemd reports a finished boot."""
        self._workdir = tempfile.TemporaryDirectory(prefix="udpbindd-nspawn-")
        command = [
            _which("systemd-nspawn") or "systemd-nspawn",
            f"--directory={self.rootfs}",
            "--boot",
            f"--machine={self.name}",
            # No D-Bus on the host to register with, and no systemd to create a scope.
            "--register=no",
            "--keep-unit",
            "--volatile=overlay",
            "--console=passive",
        ]
        if self.private_network:
            command.append("--private-network")
        for host_path, inner in self.bind_ro.items():
            command.append(f"--bind-ro={host_path}:{inner}")
        with self._log_path().open("wb") as log:
            # A session of its own, so a terminal's signals meant for pytest do not reach it.
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + BOOT_TIMEOUT
        self.leader = self._wait_leader(deadline)
        self._leader_ns = _pid_namespace(self.leader)
        # systemctl needs the manager's private socket; it appears early in the boot.
        private = Path(f"/proc/{self.leader}/root/run/systemd/private")
        self._until(deadline, "systemd's private socket", private.exists)
        done = self.run(
            "systemctl",
            "is-system-running",
            "--wait",
            check=False,
            timeout=max(1.0, deadline - time.monotonic()),
        )
        self.state = done.stdout.strip()
        # "degraded" is a finished boot with a failed unit: the tests look at their own units.
        if self.state not in ("running", "degraded"):
            raise RuntimeError(f"container boot ended {self.state!r}:\n{self.console()}")
        return self

    def _log_path(self) -> Path:
        assert self._workdir is not None
        return Path(self._workdir.name) / "console.log"

    def _wait_leader(self, deadline: float) -> int:
        assert self._proc is not None
        nspawn = self._proc.pid
        own = _pid_namespace(os.getpid())

        def leader() -> int | None:
            for child in _children(nspawn):
                namespace = _pid_namespace(child)
                # The container's PID 1 is the child in a new pid namespace.
                if namespace is not None and namespace != own:
                    return child
            return None

        return self._until(deadline, "the container's PID 1", leader)

    def _until(self, deadline: float, what: str, probe: Callable[[], T | None]) -> T:
        """Poll ``probe`` during boot; give up at ``deadline`` or as soon as nspawn exits."""
        while True:
            value = probe()
            if value:
                return value
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"systemd-nspawn exited {self._proc.returncode} before {what}:\n"
                    f"{self.console()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} in time:\n{self.console()}")
            time.sleep(0.05)

    def console(self) -> str:
        """What systemd-nspawn and the container's console printed so far."""
        if self._workdir is not None and self._log_path().exists():
            self._console = self._log_path().read_text(errors="replace")
        return self._console

    def stop(self) -> None:
        """Power off (bounded wait), then kill the nspawn pid, and the leader if it survived."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            # Without a PID 1 (a failed boot) there is nobody to power off: kill at once.
            if self.leader:
                with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                    self.run("systemctl", "poweroff", "--no-block", check=False, timeout=10)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(POWEROFF_TIMEOUT)
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(KILL_TIMEOUT)
        # Killing PID 1 of a pid namespace ends everything in it. Only if it is still the very
        # process found at boot (same pid namespace), never a recycled pid.
        if self.leader and self._leader_ns and _pid_namespace(self.leader) == self._leader_ns:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.leader, signal.SIGKILL)
        self.console()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        self._proc = None

    # -- inside ----------------------------------------------------------------------------

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the container and return its result (see the module docstring)."""
        done = subprocess.run(
            [_which("nsenter") or "nsenter", f"--target={self.leader}", "--all", "--", *argv],
            capture_output=True,
            text=True,
            env=INNER_ENV,
            input=input,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise CommandFailed(argv, done)
        return done

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, check=check)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl show -p`` for ``properties`` of ``unit``, as a dict."""
        done = self.run("systemctl", "show", unit, *(f"--property={p}" for p in properties))
        values = {}
        for line in done.stdout.splitlines():
            key, _, value = line.partition("=")
            values[key] = value
        return values

    def write_file(self, path: str, text: str) -> None:
        """Write ``text`` to ``path`` inside the container, creating its directory."""
        self.run("mkdir", "-p", str(Path(path).parent))
        self.run("sh", "-c", 'cat > "$1"', "sh", path, input=text)

    def journal(self, unit: str) -> str:
        """The messages ``unit`` logged, one per line."""
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, check=False).stdout

    def wait_for(
        self, what: str, probe: Callable[[], T], timeout: float = 30.0, interval: float = 0.1
    ) -> T:
        """Call ``probe`` until it returns something truthy (bounded); return that value."""
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout} s (last: {value!r})")
            time.sleep(interval)
