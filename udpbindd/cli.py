"""The command line: ``run``, ``check`` and ``probe``; the one place exit codes are decided.

Exit codes: 0 ok, 1 runtime failure or clash, 2 usage (argparse), 78 invalid configuration.
No command prints a traceback for bad input.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from udpbindd import __version__, activation, fdlimit, logs, privileges
from udpbindd.config import (
    DEFAULT_PATH,
    Config,
    ConfigError,
    LogFormat,
    LogLevel,
    load,
    load_default,
)
from udpbindd.daemon import Daemon, StartFailed
from udpbindd.expand import Binding
from udpbindd.metrics import MetricsError, MetricsServer, make_registry
from udpbindd.probe import DEFAULT_MESSAGE, ProbeFailed, printable, probe
from udpbindd.report import as_json, as_text, ok
from udpbindd.survey import survey
from udpbindd.systemd import Notifier

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = getattr(os, "EX_CONFIG", 78)

log = structlog.get_logger("udpbindd")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="udpbindd",
        description="UDP listeners from one YAML file: clash-checked, bound, served, counted.",
    )
    parser.add_argument("--version", action="version", version=f"udpbindd {__version__}")
    # The logging options work before or after the command: a parent parser shared by all,
    # with SUPPRESS so a subcommand's absent option does not overwrite a global one.
    logging_options = argparse.ArgumentParser(add_help=False)
    for target in (parser, logging_options):
        default = None if target is parser else argparse.SUPPRESS
        target.add_argument(
            "--log-level", type=LogLevel, choices=list(LogLevel), default=default,
            help="overrides logging.level",
        )  # fmt: skip
        target.add_argument(
            "--log-format", type=LogFormat, choices=list(LogFormat), default=default,
            help="overrides logging.format",
        )  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config_help = f"configuration file (default {DEFAULT_PATH}, else the embedded default)"
    run = commands.add_parser(
        "run", help="run the daemon in the foreground", parents=[logging_options]
    )
    run.add_argument("-c", "--config", type=Path, help=config_help)
    run.add_argument(
        "--user", metavar="NAME",
        help="switch to this user once every socket is bound (overrides user:)",
    )  # fmt: skip

    check = commands.add_parser(
        "check",
        help="validate a file, show its socket names and explain every clash",
        parents=[logging_options],
    )
    check.add_argument("-c", "--config", type=Path, help=config_help)
    check.add_argument("--format", choices=("text", "json"), default="text")
    check.add_argument(
        "--no-host", action="store_true", help="do not check sockets other processes hold"
    )

    probe_cmd = commands.add_parser("probe", help="send one datagram and print the reply")
    probe_cmd.add_argument("host")
    probe_cmd.add_argument("port", type=_port)
    probe_cmd.add_argument("--message", default=DEFAULT_MESSAGE)
    probe_cmd.add_argument(
        "--timeout", type=_seconds, default=2.0, metavar="S",
        help="the longest wait between retries; the first is 0.1 s, doubling (default 2)",
    )  # fmt: skip
    return parser


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not in 1..65535")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{value} is not in 0.1..3600")
    return value


def _load(path: Path | None) -> Config:
    if path is not None:
        return load(path)
    try:
        present = DEFAULT_PATH.exists()
    except OSError:
        present = True  # it may be there but unreadable: load() reports that clearly
    return load(DEFAULT_PATH) if present else load_default()


def _configure_logging(args: argparse.Namespace, config: Config | None) -> None:
    level = args.log_level or (config.logging.level if config else LogLevel.INFO)
    fmt = args.log_format or (config.logging.format if config else LogFormat.AUTO)
    logs.configure(level, fmt)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.command == "probe":
        return _probe(args)
    try:
        config = _load(args.config)
    except ConfigError as error:
        _configure_logging(args, None)
        for problem in error.problems:
            print(problem, file=sys.stderr)
        print(
            f"udpbindd: invalid configuration ({len(error.problems)} problem(s))", file=sys.stderr
        )
        return EXIT_CONFIG
    _configure_logging(args, config)
    if args.command == "check":
        return _check(args, config)
    return _run(args.config, config, args.user)


def _check(args: argparse.Namespace, config: Config) -> int:
    try:
        result = survey(config.enabled_listeners, with_host=not args.no_host)
    except OSError as error:
        print(f"udpbindd: cannot read this host's interfaces or sockets: {error}", file=sys.stderr)
        return EXIT_FAILURE
    render = as_json if args.format == "json" else as_text
    sys.stdout.write(render(result, config.source))
    return EXIT_OK if ok(result) else EXIT_FAILURE


def _run(path: Path | None, config: Config, user: str | None = None) -> int:
    # Whether the user exists and can be switched to is known before anything is bound.
    account = None
    name = user or config.user
    if name:
        try:
            account = privileges.resolve(name)
        except privileges.PrivilegeError as error:
            print(f"udpbindd: {error}", file=sys.stderr)
            return EXIT_FAILURE
    notifier = Notifier()
    limits = fdlimit.raise_soft_limit()
    # Adopt systemd's sockets first, so the host survey knows they are udpbindd's own.
    inherited, rejected = activation.inherited()
    for item in rejected:
        log.warning("inherited_rejected", fd=item.fd, fdname=item.fdname, reason=item.reason)
    daemon = Daemon(config, notifier=notifier, loader=lambda: _load(path), inherited=inherited)
    exporter = MetricsServer(make_registry(daemon.snapshot))
    # The handlers do nothing: set_wakeup_fd writes each signal number into the loop's
    # socketpair, and the loop dispatches it. Installing them replaces the defaults that kill.
    previous = signal.set_wakeup_fd(daemon.wake_fd, warn_on_full_buffer=False)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _ignore)
    try:
        try:
            # Subscribed to interface changes before the survey reads the interfaces, so no
            # change falls between them.
            preflight = survey(
                config.enabled_listeners,
                exclude_inodes=daemon.own_inodes(),
                interfaces=daemon.watch(),
            )
            own = len(preflight.expansion.bindings) - len(inherited)
            refusal = fdlimit.shortage(own, limits[0]) or _privileged_ports(
                preflight.expansion.bindings, inherited
            )
            if refusal:
                print(f"udpbindd: {refusal}", file=sys.stderr)
                notifier.status(f"failed: {refusal}"[:400])
                return EXIT_FAILURE
            daemon.start(preflight)
        except StartFailed as error:
            return _start_failed(error, notifier)
        except OSError as error:
            print(
                f"udpbindd: cannot read this host's interfaces or sockets: {error}", file=sys.stderr
            )
            return EXIT_FAILURE
        try:
            exporter.start(config.metrics.listen, config.metrics.tls)
        except MetricsError as error:
            print(f"udpbindd: {error}", file=sys.stderr)
            notifier.status(f"failed: {error}"[:400])
            return EXIT_FAILURE
        if config.metrics.listen:
            log.info("metrics_serving", listen=[str(e) for e in config.metrics.listen])
        if account is not None:
            # Every socket, the metrics one included, is bound: nothing needs root any more.
            try:
                privileges.switch(account)
            except privileges.PrivilegeError as error:
                print(f"udpbindd: {error}", file=sys.stderr)
                notifier.status(f"failed: {error}"[:400])
                return EXIT_FAILURE
            log.info(
                "privileges_dropped",
                user=account.name,
                uid=account.uid,
                gid=account.gid,
                groups=list(account.groups),
            )
        # READY=1 comes from run(): every required listener is bound and metrics are served.
        # A required listener still waiting for its address at its bind_timeout ends it.
        try:
            daemon.run()
        except StartFailed as error:
            return _start_failed(error, notifier)
        return EXIT_OK
    finally:
        exporter.stop()
        signal.set_wakeup_fd(previous)
        daemon.shutdown()


def _privileged_ports(
    bindings: Sequence[Binding], inherited: Sequence[activation.Inherited]
) -> str:
    """Why the required bindings udpbindd must bind itself cannot be bound; "" if they can.

    Sockets passed by socket activation need no privilege here, and a listener with
    ``required: false`` may fail to bind (it is reported like any other bind failure).
    """
    adopted = activation.assign(inherited, bindings).adopted
    own = [b for b in bindings if b.listener.required and b not in adopted]
    return privileges.privileged_port_problem(
        own,
        capabilities=privileges.effective_capabilities(),
        port_start=privileges.unprivileged_port_start(),
    )


def _start_failed(error: StartFailed, notifier: Notifier) -> int:
    """Report required listeners that could not be bound, one line each; the exit status."""
    for failure in error.failures:
        print(f"udpbindd: cannot bind {failure}", file=sys.stderr)
    notifier.status(f"failed: {error.failures[0]}"[:400])
    return EXIT_FAILURE


def _ignore(signum: int, frame: object) -> None:
    """Signal handlers do nothing: the wake-up fd carries the signal to the loop."""


def _probe(args: argparse.Namespace) -> int:
    def connected(client: str) -> None:
        # Shown before the first wait, as the classic client does, even if nothing answers.
        print(f"client socket name is {client}", flush=True)

    try:
        # fsencode: argv bytes that are not UTF-8 arrive as surrogates; send them unchanged.
        message = os.fsencode(args.message)
        result = probe(args.host, args.port, message, args.timeout, on_connected=connected)
    except ProbeFailed as error:
        print(f"udpbindd probe: {error}", file=sys.stderr)
        return EXIT_FAILURE
    text = printable(result.reply)
    print(f"reply from {result.server} ({len(result.reply)} bytes): {text}")
    return EXIT_OK
