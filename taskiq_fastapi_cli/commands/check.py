"""`check`: import everything as `worker` does and show each task's dependencies.

Nothing is started: no worker, no lifespan, no broker connection. The walk
is the one a worker does at startup, so what `check` reports is what would
stop a worker, and a user's CI can run it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import typer

from taskiq_fastapi import dependencies, request_context
from taskiq_fastapi.dependencies import Node, TaskPlan
from taskiq_fastapi.exceptions import TaskiqFastAPIError
from taskiq_fastapi.integration import app_source
from taskiq_fastapi.loader import load_app
from taskiq_fastapi.request_context import CarrySettings
from taskiq_fastapi_cli.commands.worker import load_project
from taskiq_fastapi_cli.exceptions import CLIError
from taskiq_fastapi_cli.runtime.args import parse_taskiq_args, with_app
from taskiq_fastapi_cli.runtime.discover import unservable

SOURCES = {
    "message": "message argument",
    "taskiq": "TaskiqDepends",
    "fastapi": "FastAPI Depends",
    "request": "per-task Request, state from the app's lifespan",
    "context": "taskiq context",
    "carried": "from the request that kicked the task",
    "http": "only in an HTTP request: PROBLEM",
}
NOT_CARRIED = "only in an HTTP request, and the app carries none: PROBLEM"
NOT_CARRIED_BY_APP = "only in an HTTP request, and the app does not carry it: PROBLEM"


def run_check(
    taskiq_argv: Sequence[str], app: str | None, factory: bool, as_json: bool
) -> int:
    """Print the report; 1 when a task has a problem, 0 otherwise."""
    args = with_app(parse_taskiq_args(taskiq_argv), app or "", None)
    broker = load_project(args, factory)
    plans = dependencies.plans(broker)
    source = app_source(broker)
    assert source is not None  # load_project wired the broker to its app
    # As the worker decides: from the app, so a factory is called here.
    try:
        carry = request_context.carried(load_app(source), broker)
    except TaskiqFastAPIError as exc:
        raise CLIError(str(exc)) from None
    problems = [problem for plan in plans for problem in plan.problems_when(carry)]
    refused = unservable(broker, args.broker)
    if refused is not None:  # the worker's first refusal, before any task's
        problems.insert(0, refused)
    if as_json:
        report = {
            "tasks": [
                {
                    "name": plan.task_name,
                    "dependencies": [node.as_dict() for node in plan.tree],
                    "problems": plan.problems_when(carry),
                }
                for plan in plans
            ],
            "problems": problems,
            # Whether "carried" parameters get the kicking request's values,
            # and which headers (cookies: the "cookie" header) it carries.
            "carrying": carry is not None,
            "carried_headers": None if carry is None else carry.names,
        }
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo("\n".join(_text(plans, problems, carry)))
    return 1 if problems else 0


def _text(
    plans: list[TaskPlan], problems: list[str], carry: CarrySettings | None
) -> Iterator[str]:
    if not plans:
        yield "No tasks found: name the task modules after the broker."
    for plan in plans:
        yield plan.task_name
        yield from _nodes(plan.tree, "  ", carry)
    if not problems:
        if plans:
            yield ""
            yield f"{_count(len(plans), 'task')} checked, no problems."
        return
    yield ""
    yield f"{_count(len(problems), 'problem')}:"
    yield from (f"- {problem}" for problem in problems)


def _count(number: int, noun: str) -> str:
    """`1 task`, `2 tasks`: never "1 tasks" or "0 task"."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _nodes(
    nodes: list[Node], indent: str, carry: CarrySettings | None
) -> Iterator[str]:
    for node in nodes:
        target = "" if node.source == "message" else f"{node.target}  "
        source = SOURCES[node.source]
        if node.need is not None and node.need.problem("", carry) is not None:
            source = NOT_CARRIED if carry is None else NOT_CARRIED_BY_APP
        yield f"{indent}{node.parameter}: {target}[{source}]"
        yield from _nodes(node.dependencies, indent + "  ", carry)
