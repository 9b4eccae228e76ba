"""Log records that say which task, and which request, they belong to.

`taskiq-fastapi worker --task-logs` (or `--log-json`) turns this on in the
worker: a middleware notes the running task in a context variable, and a log
record factory copies it onto every record created while the task runs,
whoever logs (the task, its dependencies, libraries, taskiq itself), as the
attributes `task_id`, `task_name` and `request_id`, which a `--log-format`
can name. Outside a task, and where the task has no request id, they are
"-". `JSONFormatter` writes one JSON object per record with the same fields.

The request id is the `X-Request-ID` header of the request that kicked the
task, when the app carries that header (`CarryRequestContext`): the header
load balancers, proxies and request-id middlewares set and the API's own
logs show, so a task's lines are found with the request's. Nothing new
leaves the API process for it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

from taskiq import AsyncBroker, TaskiqMessage, TaskiqMiddleware

from taskiq_fastapi.request_context import LABEL, read_label

REQUEST_ID_HEADER = "x-request-id"
# What a record shows where there is no task, or no request id.
NONE = "-"
FIELDS = ("task_id", "task_name", "request_id")

# (task id, task name, request id) of the task the running code serves.
_running: ContextVar[tuple[str, str, str] | None] = ContextVar(
    "taskiq_fastapi_task_logs", default=None
)
_QUOTED_HEADER = f'"{REQUEST_ID_HEADER}"'


class TaskLogContext(TaskiqMiddleware):
    """On the worker's broker: notes which task the running code serves.

    Set in `pre_execute` and never reset: taskiq runs each message in its
    own asyncio task, so the note ends with it, and the lines logged after
    the task returns (saving its result, acknowledging it) still carry it.
    """

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        _running.set((message.task_id, message.task_name, _request_id(message)))
        return message


def _request_id(message: TaskiqMessage) -> str:
    """The carried X-Request-ID header's value, if the request had one."""
    label = message.labels.get(LABEL)
    if not isinstance(label, str) or _QUOTED_HEADER not in label:
        return NONE  # the usual case costs one substring search
    try:
        headers = read_label(label)["headers"]
    except ValueError:
        return NONE  # a label this version cannot read changes nothing
    return next((value for name, value in headers if name == REQUEST_ID_HEADER), NONE)


def _forget_the_task() -> None:
    _running.set(None)


def add_to(broker: AsyncBroker) -> None:
    """Give the broker the middleware, first, so every other one's lines say it."""
    if not any(isinstance(each, TaskLogContext) for each in broker.middlewares):
        middleware = TaskLogContext()
        middleware.set_broker(broker)
        broker.middlewares.insert(0, middleware)


def install_record_factory() -> None:
    """Every log record of this process gets the task fields; idempotent.

    A process forked while a task runs serves no task of its own: taskiq's
    `--use-process-pool` forks its pool's processes from the task that
    first needs one, and each then runs many tasks, whose lines all said
    that first task's id and request id.
    """
    previous = logging.getLogRecordFactory()
    if getattr(previous, "adds_task_fields", False):
        return
    os.register_at_fork(after_in_child=_forget_the_task)

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        running = _running.get()
        if running is None:
            record.task_id = record.task_name = record.request_id = NONE
        else:
            record.task_id, record.task_name, record.request_id = running
        return record

    factory.adds_task_fields = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


class JSONFormatter(logging.Formatter):
    """One JSON object per record, on one line, as container log pipelines read.

    Keys: time (ISO 8601, UTC), level, logger, process, message, task_id,
    task_name and request_id (null where the text format shows "-"), and
    exception with the traceback when there is one. Usable in a logging
    config of your own (`--no-configure-logging`).
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": _message(record),
        }
        for field in FIELDS:
            value = getattr(record, field, NONE)
            entry[field] = None if value == NONE else value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # ASCII escapes: the line stays JSON whatever stderr's encoding is.
        return json.dumps(entry, default=str)


def _message(record: logging.LogRecord) -> str:
    """The record's message; one whose arguments do not fit it, as it came.

    logging reports such a call (a library's bug) as "--- Logging error ---"
    and a traceback, in plain text lines, where a log pipeline reads JSON.
    """
    try:
        return record.getMessage()
    except Exception as exc:  # any error formatting it
        message = _shown(str, record.msg)
        if not record.args:  # a message object whose str() failed
            return f"{message} ({_shown(str, exc)})"
        return (
            f"{message} (its arguments {_shown(repr, record.args)} did not "
            f"fit: {type(exc).__name__}: {_shown(str, exc)})"
        )


def _shown(show: Callable[[Any], str], value: Any) -> str:
    try:
        return show(value)
    except Exception:  # a value whose str() or repr() fails
        return f"<{type(value).__name__} that cannot be shown>"
