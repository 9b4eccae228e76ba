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
from typing import Any, NamedTuple

from fastapi import params
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import (
    get_dependant,
    get_typed_signature,
    request_params_to_args,
    solve_dependencies,
)
from fastapi.security.base import SecurityBase
from pydantic import AliasChoices, AliasPath, BaseModel
from starlette.datastructures import Headers, QueryParams
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

    `part` says which part of a carried request context provides it:
    "query" (from any one of `names`), "path", "header" (from any one of
    `names`, lower case) or "cookie" (from the cookie header); None when
    none can.
    """

    name: str
    what: str
    default: Any
    part: str | None
    names: frozenset[str] = frozenset()


def request_only_parameters(dependant: Dependant) -> Iterator[RequestOnly]:
    """Each value of `dependant` (not of its dependencies) only a request has."""

    def of(field: Any, part: str | None, names: frozenset[str] = frozenset()) -> Any:
        what = f"a {type(field.field_info).__name__} parameter"
        return RequestOnly(field.name, what, field.field_info.default, part, names)

    for field in dependant.path_params:
        yield of(field, "path")
    for field in dependant.query_params:
        yield from (of(field, "query", names) for names in _query_names(field))
    for field in dependant.header_params:
        yield from (of(field, "header", names) for names in _header_names(field))
    for field in dependant.cookie_params:
        yield of(field, "cookie", frozenset({"cookie"}))
    for field in dependant.body_params:
        yield of(field, None)
    special = {
        "WebSocket": dependant.websocket_param_name,
        "Response": dependant.response_param_name,
        "BackgroundTasks": dependant.background_tasks_param_name,
        "SecurityScopes": dependant.security_scopes_param_name,
    }
    for kind, name in special.items():
        if name is not None:
            yield RequestOnly(name, f"a {kind}", None, None)


def _header_names(field: Any) -> Iterator[frozenset[str]]:
    """The headers a Header parameter reads, each as the names that serve.

    As FastAPI reads them: the validation alias (one of `AliasChoices`),
    else the alias, else the name with underscores as hyphens; a Pydantic
    model read from the headers reads each of its required fields so.
    """
    convert = getattr(field.field_info, "convert_underscores", True)
    model = field.field_info.annotation
    if isinstance(model, type) and issubclass(model, BaseModel):
        for name, info in model.model_fields.items():
            if info.is_required():
                yield _names(name, info, convert)
        return
    # Which names FastAPI takes differs between its versions (alias choices,
    # for one): ask this one, offering each name it might take alone.
    names = _names(field.name, field.field_info, convert)
    candidates = names | {str(field.alias).lower(), field.name.lower()}
    read = frozenset(
        name for name in candidates if _reads(field, Headers({name: _PROBE}))
    )
    yield read or names


def _query_names(field: Any) -> Iterator[frozenset[str]]:
    """The query parameters a Query parameter reads, each as the names that serve.

    As FastAPI reads them (case-sensitive, no underscore conversion); a
    Pydantic model read from the query reads each of its fields by its
    validation alias, else its alias, else its name. Optional fields too, as
    an optional `Query()` parameter: a task would get the default where the
    route got the request's value, with no word at startup.
    """
    model = field.field_info.annotation
    if isinstance(model, type) and issubclass(model, BaseModel):
        for name, info in model.model_fields.items():
            yield _given_names(name, info) or frozenset({name})
        return
    alias = field.field_info.validation_alias
    candidates = {str(field.alias), field.name}
    if isinstance(alias, AliasChoices):
        candidates |= {
            str(c.path[0] if isinstance(c, AliasPath) else c) for c in alias.choices
        }
    elif isinstance(alias, str):
        candidates.add(alias)
    read = frozenset(
        name for name in candidates if _reads(field, QueryParams({name: _PROBE}))
    )
    yield read or frozenset({str(field.alias)})


_PROBE = "taskiq-fastapi-probe"


def _reads(field: Any, source: Headers | QueryParams) -> bool:
    """Whether FastAPI reads the parameter `field` from the one value in `source`."""
    values, errors = request_params_to_args([field], source)
    if any(error.get("type") != "missing" for error in errors):
        return True  # it read the value, and could not parse it
    return not errors and values.get(field.name) == _PROBE


def _names(name: str, info: Any, convert: bool) -> frozenset[str]:
    given = _given_names(name, info)
    if given:
        return frozenset(alias.lower() for alias in given)
    return frozenset({(name.replace("_", "-") if convert else name).lower()})


def _given_names(name: str, info: Any) -> frozenset[str]:
    """A model field's validation alias (each of its choices), else its alias.

    As written (query names are case-sensitive); empty when it has neither.
    """
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        choices = [c.path[0] if isinstance(c, AliasPath) else c for c in alias.choices]
        return frozenset(str(c) for c in choices)
    if isinstance(alias, AliasPath):
        return frozenset({str(alias.path[0])})
    if isinstance(alias, str):
        return frozenset({alias})
    if info.alias and info.alias != name:
        return frozenset({info.alias})
    return frozenset()


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
        embed_body_fields=False,
        **_exit_stack_argument(request_stack),
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


# What `solve` passes to `solve_dependencies` in every FastAPI it supports.
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
