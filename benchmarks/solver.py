"""FastAPI dependencies in a task against the same in a FastAPI route.

What a task pays to have FastAPI solve its dependencies, side by side with
what FastAPI itself pays: the same dependencies solved for a route (the
app called in process through ASGI), by FastAPI's own `solve_dependencies`
called by hand inside a task, and by fastapi-injectable (the library that
runs `Depends` outside routes). Each round times every variant once; ratios
are taken within a round, and the median round is reported, so a noisy
moment on a shared machine moves all variants of a round together.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.dependencies.utils import get_dependant, solve_dependencies
from fastapi_injectable import injectable, injectable_scope, register_app
from taskiq import InMemoryBroker, TaskiqDepends

import taskiq_fastapi
from taskiq_fastapi.request import RequestFactory

CALLS = 2_000
ROUNDS = 7
Call = Callable[[], Awaitable[object]]


async def noop() -> None:
    return None


def chain(marker: Callable[..., Any], sync: bool) -> Callable[..., Any]:
    """The session dependency of settings -> engine(request) -> session."""
    if sync:

        def get_settings() -> str:
            return "settings"

        def get_engine(request: Request, settings: str = marker(get_settings)) -> str:
            return str(request.app.state.engine)

    else:

        async def get_settings() -> str:
            return "settings"

        async def get_engine(
            request: Request, settings: str = marker(get_settings)
        ) -> str:
            return str(request.app.state.engine)

    async def get_session(engine: str = marker(get_engine)) -> AsyncIterator[str]:
        yield engine

    return get_session


def tasks(broker: InMemoryBroker, app: FastAPI) -> dict[str, Call]:
    """Each variant as a task on one worker-set-up broker, kicked in place."""

    @broker.task
    async def plain() -> None:
        return None

    @broker.task
    async def one(dependency: None = Depends(noop)) -> None:
        return None

    async def root(dependency: None = Depends(noop)) -> None: ...

    dependant = get_dependant(path="", call=root)
    make_request = RequestFactory(app, {}, "http://localhost:8000")

    @broker.task
    async def by_hand() -> None:
        """FastAPI's own: the one-dependency dependant solved in the task."""
        request = make_request(None)
        async with AsyncExitStack() as outer, AsyncExitStack() as inner:
            request.scope["fastapi_inner_astack"] = outer
            request.scope["fastapi_function_astack"] = inner
            await solve_dependencies(
                request=request,
                dependant=dependant,
                async_exit_stack=outer,
                embed_body_fields=False,
            )

    variants: dict[str, Call] = {
        "task, none": plain.kiq,
        "task, one no-op": one.kiq,
        "task, FastAPI's solve by hand": by_hand.kiq,
    }
    for sync in (False, True):
        kind = "sync" if sync else "async"
        for name, marker in (("Depends", Depends), ("TaskiqDepends", TaskiqDepends)):
            session = chain(marker, sync)

            async def task(session: str = marker(session)) -> None:
                return None

            task.__qualname__ = task.__name__ = f"chain_{name}_{kind}"
            variants[f"task, {name} chain, {kind}"] = broker.task(task).kiq
    return variants


def routes(app: FastAPI) -> dict[str, Call]:
    """Each variant as a route of `app`, called in process through ASGI."""

    @app.get("/none")
    async def plain() -> None:
        return None

    @app.get("/one")
    async def one(dependency: None = Depends(noop)) -> None:
        return None

    paths = {"route, none": "/none", "route, one no-op": "/one"}
    for sync in (False, True):
        kind = "sync" if sync else "async"

        async def route(session: str = Depends(chain(Depends, sync))) -> None:
            return None

        app.get(f"/chain-{kind}")(route)
        paths[f"route, chain, {kind}"] = f"/chain-{kind}"

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    def call(path: str) -> Call:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
            "root_path": "", "query_string": b"", "server": ("localhost", 8000),
            "client": ("127.0.0.1", 1), "headers": [(b"host", b"localhost")],
        }  # fmt: skip

        async def request() -> None:
            await app(dict(scope), receive, send)

        return request

    return {name: call(path) for name, path in paths.items()}


def injected() -> dict[str, Call]:
    """The chain through fastapi-injectable, one call in its own scope."""
    variants: dict[str, Call] = {}
    for sync in (False, True):
        kind = "sync" if sync else "async"

        @injectable
        async def use(session: str = Depends(chain(Depends, sync))) -> None:
            return None

        async def in_scope(use: Callable[[], Awaitable[None]] = use) -> None:
            async with injectable_scope():
                await use()

        variants[f"fastapi-injectable, chain, {kind}"] = in_scope
    return variants


async def time_call(call: Call) -> float:
    for _ in range(100):  # warm caches, graphs and the threadpool
        await call()
    start = time.perf_counter()
    for _ in range(CALLS):
        await call()
    return (time.perf_counter() - start) / CALLS


async def measure() -> list[dict[str, float]]:
    app = FastAPI()
    app.state.engine = "engine"
    broker = InMemoryBroker(await_inplace=True)
    variants = tasks(broker, app)
    taskiq_fastapi.init(broker, app)
    broker.is_worker_process = True
    await broker.startup()
    await register_app(app)
    variants |= routes(app) | injected()
    rounds = []
    for _ in range(ROUNDS):
        rounds.append({name: await time_call(call) for name, call in variants.items()})
    await broker.shutdown()
    return rounds


def _ratio(
    rounds: list[dict[str, float]],
    over: tuple[str, str | None],
    under: tuple[str, str | None],
) -> float:
    """Median over rounds of (over[0] - over[1]) / (under[0] - under[1])."""

    def cost(times: dict[str, float], pair: tuple[str, str | None]) -> float:
        name, baseline = pair
        return times[name] - (times[baseline] if baseline else 0.0)

    return statistics.median(cost(r, over) / cost(r, under) for r in rounds)


def run() -> list[tuple[str, float, str, float | None]]:
    """Return (what, median ratio, comparison, target or None if shown) rows."""
    rounds = asyncio.run(measure())
    print(f"FastAPI dependencies, task and route, median of {ROUNDS} rounds:")
    for name in rounds[0]:
        median = statistics.median(r[name] for r in rounds)
        print(f"  {name:<34} {median * 1e6:8.1f} us/call")
    none, one = "task, none", "task, one no-op"
    entry = _ratio(rounds, (one, none), ("task, FastAPI's solve by hand", none))
    rows: list[tuple[str, float, str, float | None]] = [
        ("FastAPI deps, fixed entry: ours / FastAPI's solve", entry, "<=", 1.25)
    ]
    for kind in ("async", "sync"):
        task, route = f"task, Depends chain, {kind}", f"route, chain, {kind}"
        injected = f"fastapi-injectable, chain, {kind}"
        taskiq = f"task, TaskiqDepends chain, {kind}"
        rows += [
            (
                f"chain alone, {kind}: task / route",
                _ratio(rounds, (task, one), (route, "route, one no-op")),
                "<=",
                1.10,
            ),
            (
                f"whole chain, {kind}: task / route",
                _ratio(rounds, (task, none), (route, "route, none")),
                "shown",
                None,
            ),
            (
                f"whole chain, {kind}: task / fastapi-injectable",
                _ratio(rounds, (task, none), (injected, None)),
                "shown",
                None,
            ),
            (
                f"task with the chain, {kind}: Depends / TaskiqDepends",
                _ratio(rounds, (task, None), (taskiq, None)),
                "shown",
                None,
            ),
        ]
    return rows
