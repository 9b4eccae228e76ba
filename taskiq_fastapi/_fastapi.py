"""Every reliance on an internal of FastAPI lives here.

Tasks' FastAPI dependencies are solved by FastAPI itself: `get_dependant`
analyses them and `solve_dependencies` runs them, so caching, `use_cache`,
generator cleanup, `scope`, `max_concurrency`, threadpools and
`app.dependency_overrides` behave as in a route. Both functions live in
`fastapi.dependencies.utils`, which FastAPI does not document as public;
tests/test_fastapi_internals.py pins what is used here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import params
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import (
    get_dependant,
    get_typed_signature,
    solve_dependencies,
)
from fastapi.security.base import SecurityBase
from starlette.requests import Request

__all__ = [
    "Dependant",
    "DependencyMarker",
    "ParamMarker",
    "RequestRejected",
    "SecurityBase",
    "analyse",
    "request_only_parameters",
    "solved",
    "typed_signature",
]

# FastAPI's markers: Depends/Security, and Query/Path/Header/Cookie/Body/Form/File.
DependencyMarker = params.Depends
ParamMarker = (params.Param, params.Body)


def typed_signature(call: Callable[..., Any]) -> inspect.Signature:
    """The signature FastAPI sees, string annotations evaluated as FastAPI does."""
    return get_typed_signature(call)


def analyse(parameters: list[inspect.Parameter]) -> Dependant:
    """FastAPI's analysis of `parameters`, as if they were a route's."""

    def root() -> None:  # pragma: no cover - never called, only analysed
        """Stands for the task: only its signature is read."""

    root.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [p.replace(kind=p.KEYWORD_ONLY) for p in parameters],
    )
    return get_dependant(path="", call=root)


def request_only_parameters(
    dependant: Dependant,
) -> Iterator[tuple[str, str, Any, bool]]:
    """(parameter, what, default, carried) for each value only a request has.

    `carried`: a carried request context provides it (query, header, cookie
    and path parameters, which FastAPI parses from the scope).
    """
    carried = (
        dependant.path_params
        + dependant.query_params
        + dependant.header_params
        + dependant.cookie_params
    )
    for field in carried + dependant.body_params:
        kind = type(field.field_info).__name__
        yield (
            field.name,
            f"a {kind} parameter",
            field.field_info.default,
            field in carried,
        )
    special = {
        "WebSocket": dependant.websocket_param_name,
        "Response": dependant.response_param_name,
        "BackgroundTasks": dependant.background_tasks_param_name,
        "SecurityScopes": dependant.security_scopes_param_name,
    }
    for kind, name in special.items():
        if name is not None:
            yield name, f"a {kind}", None, False


class RequestRejected(Exception):  # noqa: N818 - a signal to the caller, who words it
    """FastAPI's validation errors for the task's request, as a 422 lists them."""

    def __init__(self, errors: Any) -> None:
        super().__init__(errors)
        self.errors = list(errors)


class _Overrides:
    """FastAPI reads overrides from `provider.dependency_overrides`."""

    def __init__(self, overrides: dict[Any, Any]) -> None:
        self.dependency_overrides = overrides


@asynccontextmanager
async def solved(
    request: Request,
    dependant: Dependant,
    broker_overrides: dict[Any, Any],
) -> AsyncIterator[dict[str, Any]]:
    """Solve `dependant` for one task as FastAPI does for one request.

    FastAPI's request handler opens two exit stacks and puts them in the
    scope: generator dependencies with `scope="function"` close on the inner
    one, the others on the outer one. An exception raised by the task while
    this is open reaches them as it reaches them from an endpoint.
    """
    app = request.scope["app"]
    provider: Any = app
    if broker_overrides:
        provider = _Overrides({**app.dependency_overrides, **broker_overrides})
    async with AsyncExitStack() as request_stack:
        request.scope["fastapi_inner_astack"] = request_stack
        async with AsyncExitStack() as function_stack:
            request.scope["fastapi_function_astack"] = function_stack
            result = await solve_dependencies(
                request=request,
                dependant=dependant,
                dependency_overrides_provider=provider,
                embed_body_fields=False,
                **_exit_stack_argument(request_stack),
            )
            if result.errors:
                raise RequestRejected(result.errors)
            yield result.values


# What `solved` passes to `solve_dependencies` in every FastAPI it supports.
SOLVE_ARGUMENTS = (
    "request",
    "dependant",
    "dependency_overrides_provider",
    "embed_body_fields",
)


def _exit_stack_argument(stack: AsyncExitStack) -> dict[str, Any]:
    """`async_exit_stack`, while FastAPI still takes it.

    FastAPI marks it "no longer used ... remove this parameter later" (the
    stacks in the scope replaced it): once it is gone, it is not passed.
    """
    if _takes_exit_stack(solve_dependencies):
        return {"async_exit_stack": stack}
    return {}


@functools.cache
def _takes_exit_stack(solve: Callable[..., Any]) -> bool:
    return "async_exit_stack" in inspect.signature(solve).parameters


def unsupported() -> str | None:
    """Why this FastAPI's `solve_dependencies` cannot solve tasks' dependencies.

    Checked when a broker is wired to an app, so that a FastAPI release that
    changed it stops the worker at startup, naming both versions, instead of
    every task with FastAPI dependencies failing as it runs.
    """
    parameters = inspect.signature(solve_dependencies).parameters
    missing = [name for name in SOLVE_ARGUMENTS if name not in parameters]
    passed = {*SOLVE_ARGUMENTS, "async_exit_stack"}
    required = [
        name
        for name, parameter in parameters.items()
        if parameter.default is inspect.Parameter.empty
        and parameter.kind is not inspect.Parameter.VAR_KEYWORD
        and name not in passed
    ]
    if not missing and not required:
        return None
    from importlib.metadata import version

    changes = [f"no longer takes {name!r}" for name in missing]
    changes += [f"requires {name!r}" for name in required]
    return (
        f"taskiq-fastapi {version('taskiq-fastapi')} cannot solve FastAPI "
        f"dependencies with fastapi {version('fastapi')}: its "
        f"solve_dependencies {', '.join(changes)}. Install a fastapi release "
        "this taskiq-fastapi supports, or a taskiq-fastapi that supports it."
    )
