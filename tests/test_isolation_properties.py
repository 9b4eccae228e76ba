"""Generated dependency trees: FastAPI serving a route is the oracle for a task.

Each example builds one tree of dependencies twice (tests/dependency_trees.py)
and serves it both ways from one app on one in-process broker: `/route`
solves it in a FastAPI route, `/task` kicks a task declaring the same tree
with its request carried, and waits for it. Many of both run at once, each
request with its own id, twice: before and after `app.dependency_overrides`
changes. For each pair the task must have seen exactly what the route saw
(values, calls per dependency, the order generators closed, a 500 for an
error), and every function in a task or a route must have read its own
request's id from one and the same Request object.

More examples than the fixed CI set: HYPOTHESIS_PROFILE=deep make test.
"""

# No `from __future__ import annotations`: FastAPI reads the annotations of
# the functions defined inside the tests.
import asyncio
import json
import os
from collections import Counter
from typing import Any

import pytest
from dependency_trees import (
    REQUEST_ID,
    Built,
    Log,
    Spec,
    nodes,
    seen,
    trees,
    without_identities,
)
from fastapi import FastAPI
from hypothesis import example, given
from hypothesis import strategies as st
from isolation import serving
from starlette.requests import HTTPConnection
from taskiq import InMemoryBroker

import taskiq_fastapi

CONCURRENT = 6

# The reproducer: an uncached TaskiqDepends reading the request
# after an await, next to a FastAPI Header() under an uncached TaskiqDepends.
REPRODUCER = (
    Spec("taskiq", "async", use_cache=False, awaits=1, query=True),
    Spec(
        "taskiq",
        "async",
        awaits=2,
        children=(
            Spec("fastapi", "sync", header=True, twice=True, use_cache=False),
            Spec("taskiq", "async", use_cache=False, awaits=1),
        ),
    ),
)
# The bench's chain: settings -> engine(request) -> async-generator session.
BENCH_CHAIN = (
    Spec(
        "fastapi",
        "asyncgen",
        children=(
            Spec("fastapi", "sync", header=True, children=(Spec("fastapi", "sync"),)),
        ),
    ),
)


# The deep profile runs far more examples than the suite's per-test timeout.
@pytest.mark.timeout(1800 if os.environ.get("HYPOTHESIS_PROFILE") == "deep" else 120)
@given(
    children=trees(),
    raises=st.booleans(),
    override=st.integers(min_value=0, max_value=20) | st.none(),
)
@example(children=REPRODUCER, raises=False, override=None)
@example(children=REPRODUCER, raises=True, override=0)
@example(children=BENCH_CHAIN, raises=False, override=1)
@example(children=BENCH_CHAIN, raises=True, override=None)
def test_a_task_sees_what_a_route_sees_for_the_same_tree(
    children: tuple[Spec, ...], raises: bool, override: int | None
) -> None:
    asyncio.run(_serve_both_ways(children, raises, override))


async def _serve_both_ways(
    children: tuple[Spec, ...], raises: bool, override: int | None
) -> None:
    log = Log()
    broker = InMemoryBroker(max_async_tasks=1000, max_stored_results=1000)
    as_task = Built(children, log, for_task=True)
    as_route = Built(children, log, for_task=False)
    task = broker.task(task_name="tree")(as_task.endpoint(raises))

    app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker))
    app.add_middleware(
        taskiq_fastapi.CarryRequestContext, broker=broker, headers=[REQUEST_ID]
    )
    app.get("/route")(as_route.endpoint(raises))

    @app.get("/task")
    async def kick() -> Any:
        result = await (await task.kiq()).wait_result(timeout=10)
        if result.is_err:
            raise result.error
        return result.return_value

    fastapi_nodes = [name for name, spec in nodes(children) if spec.kind == "fastapi"]
    async with serving(app) as client:
        for round_ in range(2):
            if round_ == 1 and override is not None and fastapi_nodes:
                replaced = fastapi_nodes[override % len(fastapi_nodes)]
                for built in (as_task, as_route):
                    app.dependency_overrides[built.functions[replaced]] = _overriding(
                        log
                    )
            ids = [
                (f"<route-{round_}-{i}>", f"<task-{round_}-{i}>")
                for i in range(CONCURRENT)
            ]
            responses = await asyncio.gather(
                *(
                    client.get(f"/{side}", params={"q": rid}, headers={REQUEST_ID: rid})
                    for pair in ids
                    for side, rid in zip(("route", "task"), pair, strict=True)
                )
            )
            for (route_id, task_id), route, task_response in zip(
                ids, responses[::2], responses[1::2], strict=True
            ):
                _agree(log, route_id, route, task_id, task_response)


def _overriding(log: Log) -> Any:
    def override(conn: HTTPConnection) -> Any:
        request_id = conn.headers[REQUEST_ID]
        log.add(request_id, "call", "override")
        return {"n": "override", "saw": [request_id], "conn": id(conn), "deps": []}

    return override


def _agree(log: Log, route_id: str, route: Any, task_id: str, task: Any) -> None:
    assert (task.status_code, route.status_code) in ((200, 200), (500, 500)), (
        route.text,
        task.text,
    )
    if route.status_code == 200:
        for request_id, result in ((route_id, route.json()), (task_id, task.json())):
            read = list(seen(result))
            assert {v for what, v in read if what == "saw"} == {request_id}
            assert len({v for what, v in read if what == "conn"}) == 1
        as_route = json.dumps(without_identities(route.json())).replace(route_id, "")
        as_task = json.dumps(without_identities(task.json())).replace(task_id, "")
        assert as_task == as_route
    route_log, task_log = log.entries[route_id], log.entries[task_id]
    assert Counter(task_log) == Counter(route_log)
    closes = [entry for entry in route_log if entry[0] == "close"]
    assert [entry for entry in task_log if entry[0] == "close"] == closes
