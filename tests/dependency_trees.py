"""Generated dependency trees, built as a task's and as a route's (issue 17).

A `Spec` describes one dependency: FastAPI's `Depends` or taskiq's
`TaskiqDepends`, sync, async or a generator, cached or not, declared once or
twice by its parent, what it reads of the request (`Request`,
`HTTPConnection`, a `Header()`, a `Query()`), how often it awaits, and its
own dependencies. `build` turns a tree of them into real functions, once
with the markers a task uses and once with `Depends` everywhere, as a route
would declare the same tree, so FastAPI serving the route is the oracle for
the task.

Every function logs its calls (and a generator its closing) under the
request id it read, and returns what it read, so a value or a log entry that
came from another request shows up under the wrong id.

The trees are the ones where taskiq's and FastAPI's rules agree, so that
FastAPI can judge. A task solves all its FastAPI dependencies once, as a
route does; taskiq resolves an uncached `TaskiqDepends` with a fresh cache
of its own (FastAPI keeps the request's), and takes a cached one declared
twice from its cache whole (FastAPI solves a cached dependency's own
dependencies again for each declaration, calling uncached ones again). So:
a `TaskiqDepends` node has no generator (taskiq closes its own generators
after FastAPI's); below an uncached `TaskiqDepends` a `TaskiqDepends` is
uncached and a FastAPI dependency is cached, with all below it; and a
`TaskiqDepends` declared twice has nothing uncached below it.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, Header, Query
from hypothesis import strategies as st
from starlette.requests import HTTPConnection, Request
from taskiq import TaskiqDepends

REQUEST_ID = "x-request-id"
STYLES = {"fastapi": ("async", "sync", "asyncgen", "gen"), "taskiq": ("async", "sync")}


@dataclass(frozen=True)
class Spec:
    kind: str  # "fastapi" or "taskiq"
    style: str  # "async", "sync", "asyncgen", "gen"
    use_cache: bool = True
    twice: bool = False
    connection: str = "request"  # how it reads the request: "request"/"connection"
    header: bool = False  # reads the request id with Header() too (FastAPI)
    query: bool = False  # reads ?q= too
    awaits: int = 0
    children: tuple[Spec, ...] = ()


@dataclass
class Log:
    """What every request / task did, by the request id each function read."""

    entries: defaultdict[str, list[tuple[str, str]]] = field(
        default_factory=lambda: defaultdict(list)
    )

    def add(self, request_id: str, what: str, node: str) -> None:
        self.entries[request_id].append((what, node))


def specs(depth: int = 3, only: str | None = None) -> st.SearchStrategy[Spec]:
    """Trees up to `depth` deep. `only`: "fastapi" (FastAPI's, cached or not),
    "cached-fastapi" (FastAPI's, all cached) or "uncached-taskiq" (below an
    uncached TaskiqDepends: uncached TaskiqDepends or cached FastAPI ones)."""

    @st.composite
    def node(draw: st.DrawFn) -> Spec:
        if only == "uncached-taskiq":
            kind = draw(st.sampled_from(["fastapi", "taskiq"]))
            use_cache = kind == "fastapi"
        elif only == "cached-fastapi":
            kind, use_cache = "fastapi", True
        else:
            kind = only or draw(st.sampled_from(["fastapi", "taskiq"]))
            use_cache = draw(st.booleans())
        style = draw(st.sampled_from(STYLES[kind]))
        children: tuple[Spec, ...] = ()
        if depth > 1:
            below = only if kind == "fastapi" and only else kind
            if kind == "fastapi" and only == "uncached-taskiq":
                below = "cached-fastapi"
            elif kind == "taskiq":
                below = None if use_cache else "uncached-taskiq"
            children = tuple(
                draw(st.lists(specs(depth - 1, below), max_size=2)),
            )
        twice = draw(st.booleans())
        if kind == "taskiq" and not _all_cached(children):
            twice = False
        return Spec(
            kind=kind,
            style=style,
            use_cache=use_cache,
            twice=twice,
            connection=draw(st.sampled_from(["request", "connection"])),
            header=kind == "fastapi" and draw(st.booleans()),
            query=draw(st.booleans()),
            awaits=draw(st.integers(0, 2)) if "async" in style else 0,
            children=children,
        )

    return node()


def _all_cached(children: tuple[Spec, ...]) -> bool:
    return all(c.use_cache and _all_cached(c.children) for c in children)


def trees() -> st.SearchStrategy[tuple[Spec, ...]]:
    """The dependencies of a task (or a route): one to three trees."""
    return st.lists(specs(), min_size=1, max_size=3).map(tuple)


def nodes(children: tuple[Spec, ...], prefix: str = "") -> Iterator[tuple[str, Spec]]:
    for index, child in enumerate(children):
        name = f"{prefix}{index}"
        yield name, child
        yield from nodes(child.children, name + ".")


class Built:
    """One tree's functions as a task declares them (`for_task`) or a route."""

    def __init__(self, children: tuple[Spec, ...], log: Log, for_task: bool) -> None:
        self.log = log
        self.for_task = for_task
        self.functions: dict[str, Callable[..., Any]] = {}
        self.parameters = self.dependency_parameters(children, "")

    def marker(self, spec: Spec, function: Callable[..., Any]) -> Any:
        if self.for_task and spec.kind == "taskiq":
            return TaskiqDepends(function, use_cache=spec.use_cache)
        return Depends(function, use_cache=spec.use_cache)

    def dependency_parameters(
        self, children: tuple[Spec, ...], prefix: str
    ) -> list[inspect.Parameter]:
        parameters = []
        for index, child in enumerate(children):
            name = f"{prefix}{index}"
            function = self.function(name, child)
            self.functions[name] = function
            for copy in range(2 if child.twice else 1):
                parameters.append(
                    inspect.Parameter(
                        f"d{name.replace('.', '_')}_{copy}",
                        inspect.Parameter.KEYWORD_ONLY,
                        default=self.marker(child, function),
                        annotation=Any,
                    )
                )
        return parameters

    def function(self, name: str, spec: Spec) -> Callable[..., Any]:
        read_parameters = [
            inspect.Parameter(
                "conn",
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Request if spec.connection == "request" else HTTPConnection,
            )
        ]
        if spec.header:
            read_parameters.append(
                inspect.Parameter(
                    "x_request_id",
                    inspect.Parameter.KEYWORD_ONLY,
                    default=Header(),
                    annotation=str,
                )
            )
        if spec.query and spec.kind == "fastapi":
            read_parameters.append(
                inspect.Parameter(
                    "q", inspect.Parameter.KEYWORD_ONLY, default=Query(), annotation=str
                )
            )
        children = self.dependency_parameters(spec.children, name + ".")
        log = self.log

        def value(kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
            conn = kwargs["conn"]
            request_id = conn.headers[REQUEST_ID]
            saw = [request_id]
            if spec.header:
                saw.append(kwargs["x_request_id"])
            if spec.query:
                saw.append(kwargs["q"] if "q" in kwargs else conn.query_params["q"])
            log.add(request_id, "call", name)
            return request_id, {
                "n": name,
                "saw": saw,
                "conn": id(conn),
                "deps": [kwargs[p.name] for p in children],
            }

        if spec.style == "sync":

            def call(**kwargs: Any) -> Any:
                return value(kwargs)[1]

        elif spec.style == "async":

            async def call(**kwargs: Any) -> Any:
                for _ in range(spec.awaits):
                    await asyncio.sleep(0)
                return value(kwargs)[1]

        elif spec.style == "gen":

            def call(**kwargs: Any) -> Iterator[Any]:  # type: ignore[misc]
                request_id, result = value(kwargs)
                try:
                    yield result
                finally:
                    log.add(request_id, "close", name)

        else:

            async def call(**kwargs: Any) -> AsyncIterator[Any]:  # type: ignore[misc]
                for _ in range(spec.awaits):
                    await asyncio.sleep(0)
                request_id, result = value(kwargs)
                try:
                    yield result
                finally:
                    log.add(request_id, "close", name)

        parameters = read_parameters + children
        call.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        call.__annotations__ = {p.name: p.annotation for p in parameters}
        call.__qualname__ = call.__name__ = f"dep_{name.replace('.', '_')}"
        return call

    def endpoint(self, raises: bool) -> Callable[..., Any]:
        """The task's (or route's) own function: it returns what it got."""
        dependencies = self.parameters

        async def endpoint(**kwargs: Any) -> Any:
            conn = kwargs["request"]
            got = {
                "saw": [conn.headers[REQUEST_ID]],
                "conn": id(conn),
                "deps": [kwargs[p.name] for p in dependencies],
            }
            if raises:
                raise ValueError("boom")
            return got

        request = inspect.Parameter(
            "request", inspect.Parameter.KEYWORD_ONLY, annotation=Request
        )
        parameters = [request, *dependencies]
        endpoint.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        endpoint.__annotations__ = {p.name: p.annotation for p in parameters}
        return endpoint


def seen(value: Any) -> Iterator[tuple[str, Any]]:
    """Every request id and connection every function of a result read."""
    for request_id in value["saw"]:
        yield "saw", request_id
    yield "conn", value["conn"]
    for dependency in value["deps"]:
        yield from seen(dependency)


def without_identities(value: Any) -> Any:
    """A result as the route and the task must agree on it (no object ids)."""
    return {
        **{key: v for key, v in value.items() if key != "conn"},
        "deps": [without_identities(d) for d in value["deps"]],
    }
