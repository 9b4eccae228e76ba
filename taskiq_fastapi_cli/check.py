"""`check`: import everything as `worker` does and show each task's dependencies.

Nothing is started: no worker, no lifespan, no broker connection. The walk
is the one a worker does at startup, so what `check` reports is what would
stop a worker, and a user's CI can run it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import typer

from taskiq_fastapi import dependencies
from taskiq_fastapi.dependencies import Node, TaskPlan
from taskiq_fastapi_cli.args import parse_taskiq_args, with_app
from taskiq_fastapi_cli.worker import load_project

SOURCES = {
    "message": "message argument",
    "taskiq": "TaskiqDepends",
    "fastapi": "FastAPI Depends",
    "request": "per-task Request, state from the app's lifespan",
    "context": "taskiq context",
    "http": "only in an HTTP request: PROBLEM",
}


def run_check(
    taskiq_argv: Sequence[str], app: str | None, factory: bool, as_json: bool
) -> int:
    """Print the report; 1 when a task has a problem, 0 otherwise."""
    args = with_app(parse_taskiq_args(taskiq_argv), app or "", None)
    broker = load_project(args, factory)
    plans = dependencies.plans(broker)
    problems = [problem for plan in plans for problem in plan.problems]
    if as_json:
        report = {
            "tasks": [
                {
                    "name": plan.task_name,
                    "dependencies": [node.as_dict() for node in plan.tree],
                    "problems": plan.problems,
                }
                for plan in plans
            ],
            "problems": problems,
        }
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo("\n".join(_text(plans, problems)))
    return 1 if problems else 0


def _text(plans: list[TaskPlan], problems: list[str]) -> Iterator[str]:
    if not plans:
        yield "No tasks found: name the task modules after the broker."
    for plan in plans:
        yield plan.task_name
        yield from _nodes(plan.tree, "  ")
    yield ""
    if not problems:
        yield f"{len(plans)} task{'s' if len(plans) > 1 else ''} checked, no problems."
        return
    yield f"{len(problems)} problem{'s' if len(problems) > 1 else ''}:"
    yield from (f"- {problem}" for problem in problems)


def _nodes(nodes: list[Node], indent: str) -> Iterator[str]:
    for node in nodes:
        target = "" if node.source == "message" else f"{node.target}  "
        yield f"{indent}{node.parameter}: {target}[{SOURCES[node.source]}]"
        yield from _nodes(node.dependencies, indent + "  ")
