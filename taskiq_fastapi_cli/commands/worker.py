"""The steps of `worker`: parse, check everything in the main process, hand over.

Everything that can be wrong with the input is found here, before any worker
process starts, so a typo ends the command in a second with one line.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import typer
from fastapi import FastAPI
from taskiq import AsyncBroker

import taskiq_fastapi
from taskiq_fastapi import dependencies, request_context
from taskiq_fastapi.exceptions import TaskiqFastAPIError
from taskiq_fastapi.integration import app_source
from taskiq_fastapi.loader import resolve_app
from taskiq_fastapi.request import base_url_scope
from taskiq_fastapi_cli.exceptions import (
    EXIT_STARTUP_FAILURE,
    EXIT_USAGE_ERROR,
    CLIError,
)
from taskiq_fastapi_cli.runtime import logs
from taskiq_fastapi_cli.runtime.args import (
    FastAPIWorkerArgs,
    parse_taskiq_args,
    with_app,
)
from taskiq_fastapi_cli.runtime.discover import (
    check_app,
    import_task_modules,
    load_broker,
    unservable,
)
from taskiq_fastapi_cli.runtime.outages import unrenewed_fetch


def start_worker(
    taskiq_argv: Sequence[str],
    *,
    app: str | None,
    factory: bool,
    base_url: str | None,
    start_method: str | None,
    broker_retry_timeout: float,
    reload_includes: Sequence[str],
    reload_excludes: Sequence[str],
    health: tuple[str, int] | None,
    stall_timeout: float,
    metrics: bool = False,
    task_logs: bool = False,
    log_json: bool = False,
) -> int:
    """Run the worker command; return its exit code or raise CLIError."""
    args = with_app(
        parse_taskiq_args(taskiq_argv),
        app or "",
        base_url,
        broker_retry_timeout=broker_retry_timeout,
        reload_includes=list(reload_includes),
        reload_excludes=list(reload_excludes),
        stall_timeout=stall_timeout,
        metrics=metrics,
        task_logs=task_logs,
        log_json=log_json,
    )
    if metrics and health is None:
        raise CLIError(
            "--metrics needs --health-port: /metrics is served there.",
            EXIT_USAGE_ERROR,
        )
    logs.check(args)
    if (reload_includes or reload_excludes) and not args.reload:
        raise CLIError(
            "--reload-include and --reload-exclude need --reload.",
            EXIT_USAGE_ERROR,
        )
    if base_url is not None:
        try:
            base_url_scope(base_url)
        except ValueError as exc:
            raise CLIError(f"--base-url: {exc}", EXIT_USAGE_ERROR) from None
    if args.reload:
        _check_reload_installed()
        _check_reload_dirs(args.reload_dirs)
    directory = None
    if metrics:
        # Before the project is imported: an app that imports
        # prometheus_client must write to the command's directory too.
        from taskiq_fastapi_cli.health.metrics import remove_directory, use_directory

        directory = use_directory()
    try:
        return _start(args, factory, start_method, health, directory)
    finally:
        if directory is not None:
            remove_directory(directory)  # the next run starts from nothing


def _start(
    args: FastAPIWorkerArgs,
    factory: bool,
    start_method: str | None,
    health: tuple[str, int] | None,
    metrics: str | None,
) -> int:
    try:
        broker = load_project(args, factory)
        refused = unservable(broker, args.broker)
        if refused is not None:  # as each worker process would refuse it
            raise CLIError(refused, EXIT_STARTUP_FAILURE)
        _check_dependencies(broker)
    except CLIError as exc:
        if not args.reload or exc.exit_code == EXIT_USAGE_ERROR:
            raise
        # Under --reload, as uvicorn's reloader: the worker process meets the
        # same mistake, says it in one line and waits for a change.
    if metrics is not None:
        from taskiq_fastapi_cli.health.metrics import keep_directory

        said = keep_directory(metrics)
        args.metrics_directory = metrics
        if said:
            typer.echo(f"Warning: {said}", err=True)
    _set_start_method(
        start_method or ("spawn" if args.reload else "fork"), _project_modules(args)
    )

    from taskiq_fastapi_cli.runtime.runner import run

    server = None
    if health is not None:
        from taskiq_fastapi_cli.health.server import HealthServer

        server = HealthServer(*health, metrics)  # bound now: a port in use stops here
    return run(args, server)


NO_APP = (
    "No app to serve: pass --app MODULE:ATTR (or set TASKIQ_FASTAPI_APP), or "
    'call taskiq_fastapi.init(broker, "module:app") in the broker module.'
)


def load_project(args: FastAPIWorkerArgs, factory: bool) -> AsyncBroker:
    """Import the broker, the app and the task modules, and wire them.

    Everything a worker would import is imported here first, so a bad path,
    a misspelled task module or a syntax error is one line before any worker
    starts. The app is `--app`, or else the one the broker module gave
    `init`, as taskiq-fastapi 0.5 projects do. No app factory is called here.
    """
    if args.app_dir:
        sys.path.insert(0, args.app_dir)  # as taskiq does, for every process
    warning = None
    try:
        broker = load_broker(args.broker)
        source = args.app or app_source(broker)
        if source is None or (factory and not args.app):
            message = "--factory needs --app." if factory else NO_APP
            raise CLIError(message, EXIT_USAGE_ERROR)
        if args.app:
            warning = check_app(args.app, factory)
        else:
            resolve_app(source)
        # Here too, so a broker module that already called init for another
        # app is refused before any worker starts.
        taskiq_fastapi.init(broker, source, base_url=args.base_url)
        import_task_modules(args.modules, args.tasks_pattern, args.fs_discover)
    except TaskiqFastAPIError as exc:
        raise CLIError(str(exc) + _where_it_looked(exc, args)) from None
    for said in (warning, unrenewed_fetch(broker)):
        if said:
            typer.echo(f"Warning: {said}", err=True)
    return broker


def _where_it_looked(exc: TaskiqFastAPIError, args: FastAPIWorkerArgs) -> str:
    """For a path whose top-level package is nowhere: where it was looked for.

    The usual cause is the command run from another directory than the
    project's. A module missing inside the user's own code is not this case.
    """
    missing = exc.__cause__
    if not isinstance(missing, ModuleNotFoundError) and missing is not None:
        # uvicorn's importer raises its own error for the module it was asked
        # for, while handling the ModuleNotFoundError.
        missing = missing.__context__
    if not isinstance(missing, ModuleNotFoundError):
        return ""
    paths = [args.broker, args.app, *args.modules]
    tops = {path.partition(":")[0].split(".")[0] for path in paths if path}
    if missing.name not in tops:
        return ""
    where = f"the current directory ({os.getcwd()})"
    if args.app_dir:
        return f" Looked in --app-dir {args.app_dir} and {where}."
    return (
        f" Looked in {where}: run it from the project's directory or pass "
        "--app-dir DIR."
    )


def _check_dependencies(broker: AsyncBroker) -> None:
    """Refuse tasks whose dependencies cannot work, before any worker starts.

    Only for an app that is a module attribute: what a factory's app carries
    is known once the factory runs, which is in each worker process, where
    the same check runs before the lifespan starts.
    """
    source = app_source(broker)
    app = None if source is None else resolve_app(source)
    if not isinstance(app, FastAPI):
        return
    try:
        dependencies.check(broker, carry=request_context.carried(app, broker))
    except TaskiqFastAPIError as exc:  # as a worker process's startup would fail
        raise CLIError(str(exc), EXIT_STARTUP_FAILURE) from None


def _check_reload_dirs(directories: Sequence[str]) -> None:
    """Name a --reload-dir that does not exist, before anything starts.

    watchdog's FileNotFoundError for it was a traceback, after the project
    had been imported. (A file is watched as it is: that works.)
    """
    for directory in directories:
        if not Path(directory).exists():
            raise CLIError(
                f"--reload-dir {directory!r}: no such directory (from {Path.cwd()}).",
                EXIT_USAGE_ERROR,
            )


def _check_reload_installed() -> None:
    """Say before starting that taskiq's file watcher lacks its `reload` extra."""
    try:
        import taskiq.cli.watcher  # noqa: F401
    except ImportError as exc:
        raise CLIError(
            f"--reload needs taskiq's reload extra ({exc}): "
            "pip install 'taskiq-fastapi[reload]'.",
        ) from None


def _set_start_method(method: str, preload: list[str]) -> None:
    """Apply --start-method; by default fork, and spawn with --reload.

    Fork on every Python, 3.14 included (whose default on Linux became
    forkserver, because forking a process with threads can deadlock): when
    the workers fork, the main process has imported the project and runs no
    thread but, with --health-port, the health endpoint's, which holds no
    lock a worker takes; forked workers share the imports' memory. --reload
    spawns so that workers import fresh code. Under forkserver the fork
    server imports the project first (`preload`), so its workers share those
    imports too. On macOS taskiq always uses spawn and sets it itself.
    """
    if sys.platform == "darwin":
        return
    multiprocessing.set_start_method(method, force=True)
    if method == "forkserver":
        multiprocessing.set_forkserver_preload(preload)


def _project_modules(args: FastAPIWorkerArgs) -> list[str]:
    """What a worker imports first: our worker code, the broker, tasks, app."""
    paths = [args.broker, args.app] if args.app else [args.broker]
    modules = [path.partition(":")[0] for path in paths]
    return ["__main__", "taskiq_fastapi_cli.runtime.runner", *modules, *args.modules]
