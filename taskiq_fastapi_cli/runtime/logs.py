"""`--task-logs` and `--log-json`: task-aware log records in every process.

Off unless asked: without either option nothing here runs and taskiq
configures logging as it always does.
"""

from __future__ import annotations

import logging

from taskiq.cli.worker.args import WorkerArgs

from taskiq_fastapi import task_logs
from taskiq_fastapi_cli.exceptions import EXIT_USAGE_ERROR, CLIError
from taskiq_fastapi_cli.runtime.args import FastAPIWorkerArgs

# taskiq's default format, with the task fields before the message.
TASK_LOG_FORMAT = (
    "[%(asctime)s][%(name)s][%(levelname)-7s][%(processName)s]"
    "[%(task_name)s %(task_id)s %(request_id)s] %(message)s"
)


def check(args: FastAPIWorkerArgs) -> None:
    """Refuse combinations that cannot mean anything; pick the default format."""
    if not (args.task_logs or args.log_json):
        return
    format_given = args.log_format != WorkerArgs.log_format
    if args.log_json and not args.configure_logging:
        raise CLIError(
            "--log-json formats the logging the command configures, which "
            "--no-configure-logging turns off: in your own logging config use "
            "taskiq_fastapi.task_logs.JSONFormatter, with --task-logs.",
            EXIT_USAGE_ERROR,
        )
    if args.log_json and format_given:
        raise CLIError(
            "--log-json and --log-format: give one or the other.", EXIT_USAGE_ERROR
        )
    if not format_given:
        args.log_format = TASK_LOG_FORMAT


def configure(args: FastAPIWorkerArgs) -> None:
    """Logging for this process: the task fields, then taskiq's configuration.

    Run in the main process before taskiq's `run_worker`, and first in each
    worker process (a forked one finds it done). As taskiq's own, the
    configuration applies only where nothing configured the root logger yet.
    """
    if args.task_logs or args.log_json:
        task_logs.install_record_factory()
    if not args.configure_logging:
        return
    if args.log_json:
        handler = logging.StreamHandler()
        handler.setFormatter(task_logs.JSONFormatter())
        logging.basicConfig(level=args.log_level, handlers=[handler])
        # Python writes a warning (a RuntimeWarning for a coroutine never
        # awaited, a library's UserWarning) to stderr as text lines of its
        # own: logged instead, it is one JSON line, with its task's fields.
        logging.captureWarnings(True)
    else:
        logging.basicConfig(level=args.log_level, format=args.log_format)
