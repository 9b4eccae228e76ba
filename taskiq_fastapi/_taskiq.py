"""Every reliance on an internal of taskiq or taskiq-dependencies lives here.

tests/test_taskiq_internals.py pins each one, so an upgrade that changes them
fails loudly instead of silently breaking injection.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from fastapi.params import Depends as FastAPIDepends
from starlette.requests import HTTPConnection, Request
from taskiq import AsyncBroker, Context

# taskiq's worker imports the broker with the current directory on sys.path;
# reusing its helper keeps app imports resolving exactly like broker imports.
from taskiq.cli.utils import add_cwd_in_path as cwd_in_sys_path
from taskiq.decor import AsyncTaskiqDecoratedTask

# taskiq's marker class: `TaskiqDepends(...)` returns one of these.
from taskiq_dependencies.dependency import Dependency as TaskiqMarker

__all__ = [
    "MakeRequest",
    "PerTaskContext",
    "TaskiqMarker",
    "cwd_in_sys_path",
    "install_request_context",
    "marker_of",
    "on_registration",
    "replace_task_function",
]

Task = AsyncTaskiqDecoratedTask[Any, Any]
# Builds a task's Request from its message's labels (None outside the receiver).
MakeRequest = Callable[[Mapping[str, Any] | None], Request]


class PerTaskContext(dict[Any, Any]):
    """A broker dependency context that gives every task its own Request.

    taskiq's receiver passes `broker.custom_dependency_context` to
    taskiq-dependencies as the initial cache, and taskiq-dependencies takes a
    `copy.copy` of that cache once per resolution, and only when the task has
    dependencies. Adding the Request at copy time gives each task a fresh
    object at no cost to tasks without dependencies, and keeps taskiq's
    prebuilt dependency graphs (overrides would rebuild them for every task).
    The receiver puts the task's `Context` in the cache just before, so its
    message's labels are the ones of the task being resolved.
    """

    def __init__(
        self,
        values: dict[Any, Any],
        make_request: MakeRequest,
    ) -> None:
        super().__init__(values)
        self.make_request = make_request

    def __copy__(self) -> dict[Any, Any]:
        values = dict(self)
        context = values.get(Context)
        labels = context.message.labels if isinstance(context, Context) else None
        request = self.make_request(labels)
        # FastAPI hands the Request itself to HTTPConnection parameters too.
        values[Request] = request
        values[HTTPConnection] = request
        return values


def install_request_context(broker: AsyncBroker, make_request: MakeRequest) -> None:
    """Make `make_request` the source of the Request the broker's tasks get."""
    current = broker.custom_dependency_context
    if isinstance(current, PerTaskContext):
        current.make_request = make_request
        return
    broker.custom_dependency_context = PerTaskContext(current, make_request)


def marker_of(parameter: inspect.Parameter) -> Any:
    """The dependency marker taskiq-dependencies reads for a parameter.

    As taskiq-dependencies does: the last taskiq or FastAPI marker in
    `Annotated[...]` metadata wins over the default value.
    """
    for meta in reversed(getattr(parameter.annotation, "__metadata__", ())):
        if isinstance(meta, (TaskiqMarker, FastAPIDepends)):
            return meta
    return parameter.default


def on_registration(broker: AsyncBroker, callback: Callable[[Task], None]) -> None:
    """Call `callback` with every task registered on the broker from now on.

    `broker.task` and `broker.register_task` both end in `_register_task`.
    """
    register = broker._register_task

    def registering(task_name: str, task: Task) -> None:
        register(task_name, task)
        callback(task)

    broker._register_task = registering  # type: ignore[method-assign]


def replace_task_function(task: Task, function: Callable[..., Any]) -> None:
    """Make workers call `function` for the task and build its graph from it.

    taskiq's receiver reads `task.original_func` for both, when it is created
    and for each message.
    """
    task.original_func = function
