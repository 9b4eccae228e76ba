"""Per-task cost of the integration, in process: bare taskiq against taskiq-fastapi.

Every variant runs the same tasks through an InMemoryBroker that executes them
in place, so the difference is what injection costs per task. Variants are
interleaved over several rounds and the best round of each is kept, which
takes most of a shared machine's noise out of the ratios.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from starlette.requests import HTTPConnection
from taskiq import Context, InMemoryBroker, TaskiqDepends, TaskiqState

import taskiq_fastapi

TASKS = 5_000
ROUNDS = 7

Setup = Callable[[InMemoryBroker, FastAPI], Awaitable[None]]


async def bare(broker: InMemoryBroker, app: FastAPI) -> None:
    await broker.startup()


async def worker_setup(broker: InMemoryBroker, app: FastAPI) -> None:
    taskiq_fastapi.init(broker, app)
    broker.is_worker_process = True
    await broker.startup()


async def populated(broker: InMemoryBroker, app: FastAPI) -> None:
    taskiq_fastapi.populate_dependency_context(broker, app)
    await broker.startup()


def no_dependencies(broker: InMemoryBroker) -> Callable[[], Awaitable[object]]:
    @broker.task
    async def task() -> None:
        return None

    return task.kiq


def native_dependencies(broker: InMemoryBroker) -> Callable[[], Awaitable[object]]:
    @broker.task
    async def task(
        context: Context = TaskiqDepends(),
        state: TaskiqState = TaskiqDepends(),
    ) -> None:
        return None

    return task.kiq


def request_dependencies(broker: InMemoryBroker) -> Callable[[], Awaitable[object]]:
    @broker.task
    async def task(
        request: Request = TaskiqDepends(),
        connection: HTTPConnection = TaskiqDepends(),
    ) -> None:
        return None

    return task.kiq


VARIANTS = {
    "bare, no deps": (bare, no_dependencies),
    "worker setup, no deps": (worker_setup, no_dependencies),
    "populate, no deps": (populated, no_dependencies),
    "bare, Context deps": (bare, native_dependencies),
    "worker setup, Request deps": (worker_setup, request_dependencies),
    "populate, Request deps": (populated, request_dependencies),
}


async def time_variant(setup: Setup, shape: Callable[..., object]) -> float:
    broker = InMemoryBroker(await_inplace=True)
    kiq = shape(broker)
    app = FastAPI()
    app.state.engine = "engine"
    await setup(broker, app)
    assert callable(kiq)
    for _ in range(200):  # warm up caches and the dependency graph
        await kiq()
    start = time.perf_counter()
    for _ in range(TASKS):
        await kiq()
    elapsed = time.perf_counter() - start
    await broker.shutdown()
    return elapsed / TASKS


async def measure() -> dict[str, float]:
    best = {name: float("inf") for name in VARIANTS}
    for _ in range(ROUNDS):
        for name, (setup, shape) in VARIANTS.items():
            best[name] = min(best[name], await time_variant(setup, shape))
    return best


def run() -> list[tuple[str, float, str, float]]:
    """Return (what, measured ratio, comparison, target) rows."""
    best = asyncio.run(measure())
    print(f"In process, best of {ROUNDS} rounds of {TASKS} tasks:")
    for name, seconds in best.items():
        print(f"  {name:<28} {seconds * 1e6:8.1f} us/task")
    return [
        (
            "no deps, worker setup / bare",
            best["worker setup, no deps"] / best["bare, no deps"],
            "<=",
            1.03,
        ),
        (
            "no deps, populate / bare",
            best["populate, no deps"] / best["bare, no deps"],
            "<=",
            1.03,
        ),
        (
            "Request deps, worker setup / Context deps",
            best["worker setup, Request deps"] / best["bare, Context deps"],
            "<=",
            1.15,
        ),
        (
            "Request deps, populate / Context deps",
            best["populate, Request deps"] / best["bare, Context deps"],
            "<=",
            1.15,
        ),
    ]
