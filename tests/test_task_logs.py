"""The task fields on log records and the JSON lines, in process (issue 25).

The worker command's own use of them: tests/test_tracing_worker.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from taskiq import InMemoryBroker

from taskiq_fastapi import task_logs
from taskiq_fastapi.request_context import LABEL

pytestmark = pytest.mark.anyio


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def kept() -> Iterator[Kept]:
    """Records of the `tasklogs` logger, with the record factory installed."""
    factory = logging.getLogRecordFactory()
    handler = Kept()
    logger = logging.getLogger("tasklogs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    task_logs.install_record_factory()
    task_logs.install_record_factory()  # once is enough: not wrapped twice
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logging.setLogRecordFactory(factory)


def fields(record: logging.LogRecord) -> tuple[Any, ...]:
    return tuple(getattr(record, name) for name in task_logs.FIELDS)


def carried(headers: list[list[str]]) -> str:
    return json.dumps({"v": 1, "method": "GET", "path": "/", "root_path": "",
                       "path_params": {}, "query_string": "", "headers": headers})  # fmt: skip


async def test_records_in_async_and_sync_tasks_carry_the_task_and_request(
    broker: InMemoryBroker, kept: Kept
) -> None:
    task_logs.add_to(broker)
    task_logs.add_to(broker)  # again: still one
    assert [type(m) for m in broker.middlewares] == [task_logs.TaskLogContext]

    @broker.task(task_name="logs:async")
    async def in_async() -> None:
        logging.getLogger("tasklogs").info("async")

    @broker.task(task_name="logs:sync")
    def in_sync() -> None:
        logging.getLogger("tasklogs").info("sync")

    logging.getLogger("tasklogs").info("outside")
    label = carried([["accept", "*/*"], ["x-request-id", "req-9"]])
    first = await in_async.kicker().with_labels(**{LABEL: label}).kiq()
    await first.wait_result()
    second = await in_sync.kiq()  # kicked outside a request: no request id
    await second.wait_result()
    unreadable = await in_async.kicker().with_labels(**{LABEL: '"x-request-id"'}).kiq()
    await unreadable.wait_result()
    assert [(r.getMessage(), *fields(r)) for r in kept.records] == [
        ("outside", "-", "-", "-"),
        ("async", first.task_id, "logs:async", "req-9"),
        ("sync", second.task_id, "logs:sync", "-"),
        ("async", unreadable.task_id, "logs:async", "-"),
    ]


def test_json_lines_have_the_same_fields(kept: Kept) -> None:
    logger = logging.getLogger("tasklogs")
    logger.info("first\nsecond")
    try:
        raise ValueError("bad")
    except ValueError:
        logger.exception("failed")
    formatter = task_logs.JSONFormatter()
    lines = [formatter.format(record) for record in kept.records]
    assert all("\n" not in line for line in lines)  # one object, one line
    plain, failed = (json.loads(line) for line in lines)
    assert plain["time"].endswith("+00:00")
    del plain["time"]
    assert plain == {
        "level": "INFO", "logger": "tasklogs", "process": "MainProcess",
        "message": "first\nsecond", "task_id": None, "task_name": None,
        "request_id": None,
    }  # fmt: skip
    assert failed["exception"].endswith("ValueError: bad")


def test_json_lines_are_ascii_so_any_stderr_encoding_keeps_them_json() -> None:
    """stderr with ascii or latin-1 (PYTHONIOENCODING, a C locale) would turn
    raw non-ASCII into backslash escapes that are not JSON, or bytes that are
    not UTF-8."""
    record = logging.LogRecord(
        "shop", logging.INFO, __file__, 1, "café ✓ 東京", (), None
    )
    line = task_logs.JSONFormatter().format(record)
    assert line.isascii()
    assert (
        json.loads(line.encode("ascii").decode("latin-1"))["message"] == "café ✓ 東京"
    )


class Unshowable:
    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


@pytest.mark.parametrize(
    ("msg", "args", "message"),
    [
        ("%d items", ("many",), "%d items (its arguments ('many',) did not fit: "
            "TypeError: %d format: a real number is required, not str)"),
        (Unshowable(), (), "<Unshowable that cannot be shown> (no str)"),
        ("%s", (Unshowable(),), "%s (its arguments <tuple that cannot be shown> "
            "did not fit: RuntimeError: no str)"),
    ],
)  # fmt: skip
def test_a_message_that_does_not_format_is_one_json_line_still(
    msg: object, args: tuple[object, ...], message: str
) -> None:
    record = logging.LogRecord("shop", logging.INFO, __file__, 1, msg, args, None)
    assert json.loads(task_logs.JSONFormatter().format(record))["message"] == message
