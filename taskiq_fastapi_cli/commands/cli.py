"""The command line: a thin Typer layer over `worker.start_worker`.

Only Typer and the standard library are imported here, so `--help` and
`--version` never pay for importing taskiq, FastAPI or user code.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from importlib.metadata import version
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

try:  # Typer 0.28+ carries its own copy of Click, and its own error class
    from typer import TyperException as UsageError
except ImportError:  # before: Click's, which Typer then depended on
    from click import ClickException as UsageError  # type: ignore[assignment,no-redef,import-not-found,unused-ignore]

from taskiq_fastapi_cli.defaults import (
    DEFAULT_BROKER_RETRY_TIMEOUT,
    DEFAULT_STALL_TIMEOUT,
)
from taskiq_fastapi_cli.exceptions import EXIT_USAGE_ERROR, CLIError

APP_ENV = "TASKIQ_FASTAPI_APP"
BASE_URL_ENV = "TASKIQ_FASTAPI_BASE_URL"
BROKER_RETRY_TIMEOUT_ENV = "TASKIQ_FASTAPI_BROKER_RETRY_TIMEOUT"
HEALTH_PORT_ENV = "TASKIQ_FASTAPI_HEALTH_PORT"
HEALTH_HOST_ENV = "TASKIQ_FASTAPI_HEALTH_HOST"
STALL_TIMEOUT_ENV = "TASKIQ_FASTAPI_STALL_TIMEOUT"
METRICS_ENV = "TASKIQ_FASTAPI_METRICS"
TASK_LOGS_ENV = "TASKIQ_FASTAPI_TASK_LOGS"
LOG_JSON_ENV = "TASKIQ_FASTAPI_LOG_JSON"
DEFAULT_HEALTH_HOST = "127.0.0.1"


class StartMethod(str, enum.Enum):
    """How worker processes are started (multiprocessing start methods)."""

    fork = "fork"
    spawn = "spawn"
    forkserver = "forkserver"


ARGUMENTS_USAGE = "BROKER [MODULES]... [TASKIQ OPTIONS]"
ARGUMENTS_HELP = (
    ("BROKER", "The broker, 'module:variable' (or a function returning one)."),
    ("MODULES", "Task modules to import, as `taskiq worker` takes them."),
    ("TASKIQ OPTIONS", "Any `taskiq worker` option, listed below."),
)


def _unescaped(formatter: Any) -> None:
    # Typer 0.16 (our floor) escapes each option's "[env var: ...; default:
    # ...]" for Rich when Rich is installed, even with rich_markup_mode=None:
    # the plain help showed a backslash before each "[".
    formatter.buffer[:] = [part.replace("\\[", "[") for part in formatter.buffer]


class PlainHelpCommand(TyperCommand):
    """Click's plain help, without Rich's escapes (see `_unescaped`)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        super().format_help(ctx, formatter)
        _unescaped(formatter)


class WorkerCommand(TyperCommand):
    """Help in taskiq's terms, and the taskiq options passed through.

    The arguments are one hidden Typer argument that collects everything for
    taskiq's own parser, so their usage and description are written here:
    Typer would show them as one optional, repeated `<list[str]>`.
    """

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return ["[OPTIONS]", ARGUMENTS_USAGE]

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self.format_usage(ctx, formatter)
        self.format_help_text(ctx, formatter)
        with formatter.section("Arguments"):
            formatter.write_dl(self.arguments_help)
        self.format_options(ctx, formatter)
        self.format_epilog(ctx, formatter)
        from taskiq_fastapi_cli.runtime.args import taskiq_options_help

        _unescaped(formatter)
        formatter.write(f"\n{self.taskiq_heading}:\n\n")
        formatter.write(taskiq_options_help(self.taskiq_options))

    arguments_help: tuple[tuple[str, str], ...] = ARGUMENTS_HELP
    taskiq_heading = "Options passed through to `taskiq worker` unchanged"
    taskiq_options: frozenset[str] | None = None  # all of them


class CheckCommand(WorkerCommand):
    """`check` lists the taskiq options it reads: where the tasks are.

    It accepts the others, so that it takes a worker's command line as is.
    """

    arguments_help = (
        *ARGUMENTS_HELP[:2],
        ("TASKIQ OPTIONS", "The `taskiq worker` options that find the tasks, below."),
    )
    taskiq_heading = "`taskiq worker` options that check reads (it ignores the others)"
    taskiq_options = frozenset({"--app-dir", "--fs-discover", "--tasks-pattern"})


app = typer.Typer(
    name="taskiq-fastapi",
    help="Run taskiq workers that serve a FastAPI app's lifespan and dependencies.",
    invoke_without_command=True,
    add_completion=False,
    # Plain Click help: Rich's table cuts long option names at 80 columns.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# Shared by `worker` and `check`, which import the same things the same way.
AppOption = Annotated[
    str | None,
    typer.Option(
        "--app",
        envvar=APP_ENV,
        metavar="MODULE:ATTR",
        help=(
            "The FastAPI app, as for uvicorn: 'module:attribute'. Without "
            "--factory, a callable that is not an app is used as a factory, "
            "with a warning, as uvicorn does. Default: the app the broker "
            "module gave taskiq_fastapi.init."
        ),
    ),
]
TaskiqArguments = Annotated[
    list[str] | None,
    typer.Argument(metavar=ARGUMENTS_USAGE, hidden=True, show_default=False),
]
FactoryOption = Annotated[
    bool,
    typer.Option(
        "--factory",
        help="Treat --app as a function that takes no argument and "
        "returns the FastAPI app.",
    ),
]


def _number(value: str | float) -> float:
    # Typer 0.29's own words for a bad float ("Input should be a valid
    # number, unable to parse string as a number") name no value.
    try:
        return float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a number of seconds.") from None


_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off", ""})


def _switch(value: str | bool) -> bool:
    # A flag's environment variable, read as Click reads it; Typer 0.29's
    # own words for a bad one ("Input should be a valid boolean, unable to
    # interpret input") name no value.
    if isinstance(value, bool):
        return value
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise typer.BadParameter(f"{value!r} is not a yes or no: expected 1 or 0.")


def _not_negative(value: float) -> float:
    # Click's float takes 'nan', which compares false with everything: as a
    # timeout it never expired (a broker retried for ever, no stall seen).
    if math.isnan(value):
        raise typer.BadParameter("nan is not a number: expected seconds, 0 or more.")
    if value < 0:
        raise typer.BadParameter(f"{value:g} is below 0: expected seconds, 0 or more.")
    return value


MIN_STALL_TIMEOUT = 0.1


def _stall_timeout(value: float) -> float:
    # Workers beat four times per --stall-timeout: at 0.0001 s an idle
    # worker's heartbeat took 7% of a core, for a stall nothing can act on.
    value = _not_negative(value)
    if 0 < value < MIN_STALL_TIMEOUT:
        raise typer.BadParameter(
            f"{value:g} is below {MIN_STALL_TIMEOUT:g}: expected seconds, "
            f"{MIN_STALL_TIMEOUT:g} or more, or 0 (off)."
        )
    return value


def _port(value: str) -> int:
    # Typer 0.29's own words for a bad int ("Input should be a valid integer,
    # unable to parse string as an integer") name no value.
    try:
        port = int(value)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise typer.BadParameter(f"{value!r} is not a port: expected 1 to 65535.")
    return port


MAX_PROBE_TIMEOUT = 86400.0


def _positive(value: float) -> float:
    # Passed on, 0, a negative value or nan made urllib fail, which the health
    # command reported as a worker that is not live (exit 1, not 2).
    if not value > 0:
        raise typer.BadParameter(f"{value:g} is not above 0: expected seconds.")
    # Past about 9.2e9 s (inf too) the socket's timeout overflowed: a traceback.
    if value > MAX_PROBE_TIMEOUT:
        raise typer.BadParameter(
            f"{value:g} is above {MAX_PROBE_TIMEOUT:g}: expected seconds, "
            "a day at most."
        )
    return value


def _print_versions(value: bool) -> None:
    if value:
        for dist in ("taskiq-fastapi", "taskiq", "fastapi"):
            typer.echo(f"{dist} {version(dist)}")
        raise typer.Exit()


VersionOption = Annotated[
    bool,
    typer.Option(
        "--version",
        callback=_print_versions,
        is_eager=True,
        help="Print the versions of taskiq-fastapi, taskiq and fastapi.",
    ),
]


@app.callback()
def root(
    ctx: typer.Context,
    show_version: VersionOption = False,
) -> None:
    """Run taskiq workers that serve a FastAPI app's lifespan and dependencies."""
    if ctx.invoked_subcommand is None:
        # Click's convention for a command run without one: help, exit 2.
        typer.echo(ctx.get_help())
        raise typer.Exit(2)


@app.command(
    cls=WorkerCommand,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
def worker(
    app_path: AppOption = None,
    taskiq_args: TaskiqArguments = None,
    factory: FactoryOption = False,
    show_version: VersionOption = False,
    base_url: Annotated[
        str | None,
        typer.Option(
            "--base-url",
            envvar=BASE_URL_ENV,
            metavar="URL",
            help="Where the API is served, for request.url_for in tasks "
            "(default http://localhost:8000; a path in it is the root path).",
        ),
    ] = None,
    start_method: Annotated[
        StartMethod | None,
        typer.Option(
            "--start-method",
            help="How worker processes start. Default: fork (spawn on macOS), "
            "on Python 3.14+ too; spawn with --reload.",
        ),
    ] = None,
    reload_include: Annotated[
        list[str] | None,
        typer.Option(
            "--reload-include",
            metavar="PATTERN",
            help="With --reload, also restart on changes to files matching "
            "this glob (repeatable). Default: *.py only, as uvicorn.",
        ),
    ] = None,
    reload_exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--reload-exclude",
            metavar="PATTERN",
            help="With --reload, ignore files matching this glob or under "
            "this directory (repeatable). Default: .*, .py[cod], .sw.*, ~*.",
        ),
    ] = None,
    health_port: Annotated[
        int | None,
        typer.Option(
            "--health-port",
            envvar=HEALTH_PORT_ENV,
            metavar="PORT",
            parser=_port,
            help="Serve /readyz and /livez on this port from the main process, "
            "for container probes (see `taskiq-fastapi health`).",
        ),
    ] = None,
    health_host: Annotated[
        str,
        typer.Option(
            "--health-host",
            envvar=HEALTH_HOST_ENV,
            metavar="HOST",
            help="Address the health endpoint listens on.",
        ),
    ] = DEFAULT_HEALTH_HOST,
    stall_timeout: Annotated[
        float,
        typer.Option(
            "--stall-timeout",
            envvar=STALL_TIMEOUT_ENV,
            metavar="SECONDS",
            parser=_number,
            callback=_stall_timeout,
            help="With --health-port: /livez fails while a worker's event "
            "loop has not run for this long (a task blocking it). 0: off.",
        ),
    ] = DEFAULT_STALL_TIMEOUT,
    metrics: Annotated[
        bool,
        typer.Option(
            "--metrics",
            envvar=METRICS_ENV,
            parser=_switch,
            help="With --health-port: serve Prometheus metrics of every worker "
            "process on /metrics there (needs the `metrics` extra).",
        ),
    ] = False,
    broker_retry_timeout: Annotated[
        float,
        typer.Option(
            "--broker-retry-timeout",
            envvar=BROKER_RETRY_TIMEOUT_ENV,
            metavar="SECONDS",
            parser=_number,
            callback=_not_negative,
            help="How long a worker keeps retrying an unreachable broker, at "
            "startup or later, before the command stops (exit 3). 0: not at all.",
        ),
    ] = DEFAULT_BROKER_RETRY_TIMEOUT,
    task_logs: Annotated[
        bool,
        typer.Option(
            "--task-logs",
            envvar=TASK_LOGS_ENV,
            parser=_switch,
            help="Log records made while a task runs carry its task_id, "
            "task_name and request_id (the carried X-Request-ID), for "
            "--log-format; the default format shows them.",
        ),
    ] = False,
    log_json: Annotated[
        bool,
        typer.Option(
            "--log-json",
            envvar=LOG_JSON_ENV,
            parser=_switch,
            help="Log one JSON object per line, with the --task-logs fields.",
        ),
    ] = False,
) -> None:
    """Start taskiq workers that run the app's lifespan and inject its Request."""
    from taskiq_fastapi_cli.runtime.preload import collection_paused
    from taskiq_fastapi_cli.runtime.starting import (
        StoppedWhileStarting,
        stops_while_starting,
    )

    try:
        # From before the imports of FastAPI, taskiq and the project, most of
        # a second, until the process manager takes the signals over (and
        # forks the workers, which ends the pause of garbage collection).
        with stops_while_starting(), collection_paused():
            from taskiq_fastapi_cli.commands.worker import start_worker

            code = start_worker(
                taskiq_args or [],
                app=app_path,
                factory=factory,
                base_url=base_url,
                start_method=start_method.value if start_method else None,
                broker_retry_timeout=broker_retry_timeout,
                reload_includes=reload_include or [],
                reload_excludes=reload_exclude or [],
                health=(health_host, health_port) if health_port else None,
                stall_timeout=stall_timeout,
                metrics=metrics,
                task_logs=task_logs,
                log_json=log_json,
            )
    except StoppedWhileStarting:
        code = 0  # no worker had started: a clean stop
    if code:
        raise typer.Exit(code)


@app.command(
    cls=CheckCommand,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
def check(
    app_path: AppOption = None,
    taskiq_args: TaskiqArguments = None,
    factory: FactoryOption = False,
    show_version: VersionOption = False,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the report as JSON."),
    ] = False,
) -> None:
    """Show each task's dependency tree and what cannot work in a worker.

    Exits 1 when a task has a problem (the worker would refuse to start), so
    CI can run it; starts nothing.
    """
    from taskiq_fastapi_cli.commands.check import run_check

    code = run_check(taskiq_args or [], app_path, factory, as_json)
    if code:
        raise typer.Exit(code)


@app.command(cls=PlainHelpCommand)
def health(
    port: Annotated[
        int,
        typer.Option(
            "--port",
            envvar=HEALTH_PORT_ENV,
            metavar="PORT",
            parser=_port,
            help="The worker's --health-port.",
        ),
    ],
    host: Annotated[
        str,
        typer.Option(
            "--host",
            envvar=HEALTH_HOST_ENV,
            metavar="HOST",
            help="The worker's --health-host.",
        ),
    ] = DEFAULT_HEALTH_HOST,
    ready: Annotated[
        bool,
        typer.Option("--ready", help="Ask whether it is ready, not only live."),
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            metavar="SECONDS",
            parser=_number,
            callback=_positive,
            help="How long to wait.",
        ),
    ] = 5.0,
) -> None:
    """Exit 0 when the worker is live (ready, with --ready), 1 otherwise.

    For Docker HEALTHCHECK and exec probes in images without curl.
    """
    from taskiq_fastapi_cli.commands.probe import probe

    if port is None:
        # Typer 0.16 (our floor) under Click 8.2+ lets a required option go
        # missing: None, which urllib met as "nonnumeric port", a traceback.
        raise CLIError(
            f"Missing option '--port' (env var: '{HEALTH_PORT_ENV}').",
            EXIT_USAGE_ERROR,
        )
    healthy, line = probe(host, port, ready, timeout)
    typer.echo(line, err=not healthy)
    if not healthy:
        raise typer.Exit(1)


def main(argv: Sequence[str] | None = None, prog_name: str | None = None) -> int:
    """Run the CLI and return its exit code; every error is one line on stderr."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except UsageError as exc:  # Click's usage errors, one line each
        typer.echo(f"Error: {exc.format_message()}", err=True)
        return exc.exit_code
    except typer.Abort:
        typer.echo("Aborted!", err=True)
        return 1
    except CLIError as exc:
        typer.echo(f"Error: {exc.message}", err=True)
        return exc.exit_code
    return result if isinstance(result, int) else 0


def run() -> None:
    """Console-script entry point."""
    raise SystemExit(main())
