"""Every reliance on an internal of FastAPI lives here.

Tasks' FastAPI dependencies are solved by FastAPI itself: `get_dependant`
analyses them and `solve_dependencies` runs them, so caching, `use_cache`,
generator cleanup, `scope`, `max_concurrency`, threadpools and
`app.dependency_overrides` behave as in a route. Both functions live in
`fastapi.dependencies.utils`, which FastAPI does not document as public;
tests/test_fastapi_internals.py pins what is used here.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, NamedTuple

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
    "RequestOnly",
    "RequestRejected",
    "SecurityBase",
    "analyse",
    "request_only_parameters",
    "solve",
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


class RequestOnly(NamedTuple):
    """A value of a dependency that only an HTTP request has.

    `carried` says which part of the request has it when a carried request
    context can provide it: "query", "path", or the lower-case name of the
    header it is read from ("cookie" for cookies); None when it never can.
    """

    name: str
    what: str
    default: Any
    carried: str | None


def request_only_parameters(dependant: Dependant) -> Iterator[RequestOnly]:
    """Each value of `dependant` (not of its dependencies) only a request has."""
    carried: list[tuple[Any, Callable[[Any], str]]] = [
        *((field, lambda _: "path") for field in dependant.path_params),
        *((field, lambda _: "query") for field in dependant.query_params),
        # FastAPI has already turned the parameter's name into its header's.
        *((field, lambda f: str(f.alias).lower()) for field in dependant.header_params),
        *((field, lambda _: "cookie") for field in dependant.cookie_params),
    ]
    for field, part in carried:
        kind = type(field.field_info).__name__
        yield RequestOnly(
            field.name, f"a {kind} parameter", field.field_info.default, part(field)
        )
    for field in dependant.body_params:
        kind = type(field.field_info).__name__
        yield RequestOnly(
            field.name, f"a {kind} parameter", field.field_info.default, None
        )
    special = {
        "WebSocket": dependant.websocket_param_name,
        "Response": dependant.response_param_name,
        "BackgroundTasks": dependant.background_tasks_param_name,
        "SecurityScopes": dependant.security_scopes_param_name,
    }
    for kind, name in special.items():
        if name is not None:
            yield RequestOnly(name, f"a {kind}", None, None)


class RequestRejected(Exception):  # noqa: N818 - a signal to the caller, who words it
    """FastAPI's validation errors for the task's request, as a 422 lists them."""

    def __init__(self, errors: Any) -> None:
        super().__init__(errors)
        self.errors = list(errors)


class _Overrides:
    """FastAPI reads overrides from `provider.dependency_overrides`."""

    def __init__(self, overrides: dict[Any, Any]) -> None:
        self.dependency_overrides = overrides


async def solve(
    request: Request,
    dependant: Dependant,
    broker_overrides: dict[Any, Any],
    request_stack: AsyncExitStack,
    function_stack: AsyncExitStack,
) -> dict[str, Any]:
    """Solve `dependant` for one task as FastAPI does for one request.

    FastAPI's request handler opens two exit stacks and puts them in the
    scope: generator dependencies with `scope="function"` close on the inner
    one (`function_stack`), the others on the outer one. The caller opens
    them around the task, so an exception the task raises reaches the
    dependencies as it reaches them from an endpoint.
    """
    app = request.scope["app"]
    provider: Any = app
    if broker_overrides:
        provider = _Overrides({**app.dependency_overrides, **broker_overrides})
    request.scope["fastapi_inner_astack"] = request_stack
    request.scope["fastapi_function_astack"] = function_stack
    result = await solve_dependencies(
        request=request,
        dependant=dependant,
        dependency_overrides_provider=provider,
        async_exit_stack=request_stack,
        embed_body_fields=False,
    )
    if result.errors:
        raise RequestRejected(result.errors)
    return result.values


@asynccontextmanager
async def solved(
    request: Request,
    dependant: Dependant,
    broker_overrides: dict[Any, Any],
) -> AsyncIterator[dict[str, Any]]:
    """`solve` with FastAPI's two exit stacks open while the caller runs."""
    async with AsyncExitStack() as request_stack, AsyncExitStack() as function_stack:
        yield await solve(
            request, dependant, broker_overrides, request_stack, function_stack
        )
