"""Pins for the FastAPI internals taskiq_fastapi/_fastapi.py relies on.

If one of these fails after an upgrade, revisit taskiq_fastapi/_fastapi.py
before anything else.
"""

import inspect
from collections.abc import AsyncIterator
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI, Header, Request
from fastapi.testclient import TestClient

from taskiq_fastapi import _fastapi
from taskiq_fastapi.request import RequestFactory


def test_a_request_handler_puts_both_exit_stacks_in_the_scope() -> None:
    app = FastAPI()
    seen: dict[str, Any] = {}

    async def function_scoped(request: Request) -> AsyncIterator[None]:
        seen.update(request.scope)
        yield

    @app.get("/")
    async def route(_: None = Depends(function_scoped, scope="function")) -> None:
        return None

    with TestClient(app) as client:
        assert client.get("/").status_code == 200
    assert {"fastapi_inner_astack", "fastapi_function_astack"} <= set(seen)


def test_solve_dependencies_takes_what_solved_passes() -> None:
    from fastapi.dependencies.utils import solve_dependencies

    parameters = inspect.signature(solve_dependencies).parameters
    for name in (
        "request",
        "dependant",
        "dependency_overrides_provider",
        "async_exit_stack",
        "embed_body_fields",
    ):
        assert name in parameters


def test_analyse_sees_parameters_as_a_route_would() -> None:
    def dep(request: Request, token: str = Header()) -> str: ...

    parameter = inspect.Parameter(
        "p0",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Annotated[str, Depends(dep)],
    )
    root = _fastapi.analyse([parameter])
    (sub,) = root.dependencies
    assert (sub.name, sub.call, sub.request_param_name) == ("p0", dep, "request")
    assert next(_fastapi.request_only_parameters(sub))[:2] == (
        "token",
        "a Header parameter",
    )


@pytest.mark.anyio
async def test_solved_runs_a_chain_with_the_apps_overrides() -> None:
    app = FastAPI()

    def settings() -> str:
        return "real"

    async def session(s: str = Depends(settings)) -> AsyncIterator[str]:
        yield f"session({s})"

    app.dependency_overrides[settings] = lambda: "override"
    parameter = inspect.Parameter(
        "p0", inspect.Parameter.KEYWORD_ONLY, default=Depends(session)
    )
    dependant = _fastapi.analyse([parameter])
    request = RequestFactory(app, {}, "http://localhost:8000")()
    async with _fastapi.solved(request, dependant, {}) as values:
        assert values == {"p0": "session(override)"}
    async with _fastapi.solved(request, dependant, {settings: lambda: "b"}) as values:
        assert values == {"p0": "session(b)"}


@pytest.mark.anyio
async def test_once_fastapi_drops_async_exit_stack_it_is_not_passed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # FastAPI marks the parameter "remove later"; a FastAPI without it works.
    real = _fastapi.solve_dependencies

    async def without_exit_stack(
        *, request: Any, dependant: Any, dependency_overrides_provider: Any,
        embed_body_fields: bool,
    ) -> Any:  # fmt: skip
        return await real(
            request=request,
            dependant=dependant,
            dependency_overrides_provider=dependency_overrides_provider,
            embed_body_fields=embed_body_fields,
            async_exit_stack=request.scope["fastapi_inner_astack"],
        )

    monkeypatch.setattr(_fastapi, "solve_dependencies", without_exit_stack)
    assert _fastapi.unsupported() is None
    app = FastAPI()

    def settings() -> str:
        return "real"

    parameter = inspect.Parameter(
        "p0", inspect.Parameter.KEYWORD_ONLY, default=Depends(settings)
    )
    request = RequestFactory(app, {}, "http://localhost:8000")()
    async with _fastapi.solved(request, _fastapi.analyse([parameter]), {}) as values:
        assert values == {"p0": "real"}


def test_a_fastapi_whose_solve_dependencies_changed_stops_init_naming_versions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from taskiq import InMemoryBroker

    import taskiq_fastapi
    from taskiq_fastapi.exceptions import DependencyError

    async def changed(*, request: Any, dependant: Any, new_required: Any) -> Any: ...

    monkeypatch.setattr(_fastapi, "solve_dependencies", changed)
    with pytest.raises(DependencyError) as raised:
        taskiq_fastapi.init(InMemoryBroker(), FastAPI())
    message = str(raised.value)
    assert "fastapi " in message
    assert "taskiq-fastapi " in message
    assert "no longer takes 'dependency_overrides_provider'" in message
    assert "requires 'new_required'" in message
