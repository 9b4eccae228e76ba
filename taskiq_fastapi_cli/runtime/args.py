"""Worker arguments: ours, plus taskiq's own, parsed by taskiq's own parser."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from taskiq.cli.worker.args import WorkerArgs

from taskiq_fastapi_cli.defaults import (
    DEFAULT_BROKER_RETRY_TIMEOUT,
    DEFAULT_STALL_TIMEOUT,
)
from taskiq_fastapi_cli.exceptions import EXIT_USAGE_ERROR, CLIError


@dataclass
class FastAPIWorkerArgs(WorkerArgs):
    """taskiq's worker arguments and the app every worker process serves.

    It is what taskiq's process manager hands to each worker process (pickled
    under the spawn start method), so it carries everything a worker needs.
    """

    app: str = ""
    base_url: str | None = None
    broker_retry_timeout: float = DEFAULT_BROKER_RETRY_TIMEOUT
    reload_includes: list[str] = field(default_factory=list)
    reload_excludes: list[str] = field(default_factory=list)
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    # --metrics (which needs --health-port): each worker writes its metrics.
    metrics: bool = False
    # Set by the command with --metrics: where every worker writes them.
    metrics_directory: str | None = None
    # --task-logs, --log-json (logs.py).
    task_logs: bool = False
    log_json: bool = False
    # Set by the process manager with --health-port: the workers' health rows.
    health_slots: Any = None
    # Set by the runner: how a worker tells the main process the command failed.
    failures: Any = None
    # Set by the runner: the stop stage the main process's signals reached.
    stop_stage: Any = None


def parse_taskiq_args(argv: Sequence[str]) -> WorkerArgs:
    """Parse `BROKER [MODULES]... [OPTIONS]` exactly as `taskiq worker` does.

    argparse reports errors with a usage block on stderr and SystemExit(2);
    they are turned into one CLIError line instead.
    """
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = WorkerArgs.from_cli(list(argv))
    except SystemExit as exc:
        lines = stderr.getvalue().strip().splitlines()
        message = lines[-1].split(": error: ", 1)[-1] if lines else str(exc)
        if message.startswith("the following arguments are required: broker"):
            message = "Missing argument 'BROKER'."
        # taskiq parses --ack-type with a lambda, which argparse names as such.
        message = message.replace("invalid <lambda> value", "invalid value")
        raise CLIError(message, EXIT_USAGE_ERROR) from None
    _check_counts(args)
    return args


def _check_counts(args: WorkerArgs) -> None:
    """Refuse the numbers taskiq's parser takes but its worker cannot run.

    taskiq reads any int: with `--workers 0` (or less) its manager starts no
    process and waits for ever, and with a negative `--max-tasks-per-child`
    each worker stops before its first task, to be restarted every second
    (its lifespan run each time). Both are usage errors here, before any
    worker starts.
    """
    if args.workers < 1:
        raise CLIError(
            f"argument --workers/-w: {args.workers} is below 1: expected 1 or "
            "more worker processes.",
            EXIT_USAGE_ERROR,
        )
    limit = args.max_tasks_per_child
    if limit is not None and limit < 0:
        raise CLIError(
            f"argument --max-tasks-per-child: {limit} is below 0: expected a "
            "number of tasks, or 0 for no limit.",
            EXIT_USAGE_ERROR,
        )
    # A pool of 0 threads or processes: each worker failed as it started,
    # with a traceback, and was restarted every second for ever.
    for option, pool in (
        ("--max-threadpool-threads", args.max_threadpool_threads),
        ("--max-process-pool-processes", args.max_process_pool_processes),
    ):
        if pool is not None and pool < 1:
            raise CLIError(
                f"argument {option}: {pool} is below 1: expected 1 or more, "
                "or leave it out for the default.",
                EXIT_USAGE_ERROR,
            )
    # taskiq 0.11's parser takes it; each worker then failed with a traceback.
    if args.max_prefetch < 0:
        raise CLIError(
            f"argument --max-prefetch: {args.max_prefetch} is below 0: expected "
            "a number of messages, or 0 for no prefetch.",
            EXIT_USAGE_ERROR,
        )
    # argparse's float takes nan (a traceback in each worker as it stopped)
    # and negative values (the app's lifespan never shut down, exit 4; the
    # running tasks not waited for).
    for option, seconds in (
        ("--shutdown-timeout", args.shutdown_timeout),
        ("--wait-tasks-timeout", args.wait_tasks_timeout),
    ):
        if seconds is not None and not seconds >= 0:
            raise CLIError(
                f"argument {option}: {seconds:g} is not a number of seconds, "
                "0 or more.",
                EXIT_USAGE_ERROR,
            )


def with_app(
    taskiq_args: WorkerArgs,
    app: str,
    base_url: str | None,
    **ours: Any,
) -> FastAPIWorkerArgs:
    """Add our options to what taskiq parsed."""
    values = {f.name: getattr(taskiq_args, f.name) for f in fields(taskiq_args)}
    return FastAPIWorkerArgs(**values, app=app, base_url=base_url, **ours)


def taskiq_options_help(only: Collection[str] | None = None) -> str:
    """The option list of the installed taskiq's `taskiq worker --help`.

    Without argparse's `-h, --help` (the command lists its own), and with
    `only`, just the options named there: `check` reads a few of them.
    """
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.suppress(SystemExit):
        WorkerArgs.from_cli(["--help"])
    text = stdout.getvalue()
    # Drop argparse's usage block and positional section: ours shows those.
    lines = text[text.find("options:") :].splitlines()[1:]
    # One block per option: its first line is indented two spaces, then "-".
    blocks: list[list[str]] = []
    for line in lines:
        if line.startswith("  -"):
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line)
    kept = [
        block
        for block in blocks
        if "--help" not in _names(block[0])
        and (only is None or not _names(block[0]).isdisjoint(only))
    ]
    return "\n".join(line for block in kept for line in block) + "\n"


def _names(first_line: str) -> set[str]:
    """The option strings on an argparse help line: `--app-dir APP_DIR, -d ...`."""
    usage = first_line.strip().split("  ", 1)[0]
    return {word.rstrip(",") for word in usage.split() if word.startswith("-")}
