"""`init` and `populate_dependency_context`: wire one FastAPI app into one broker."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any
from weakref import WeakKeyDictionary

from fastapi import FastAPI
from taskiq import AsyncBroker, TaskiqEvents, TaskiqState

from taskiq_fastapi import _fastapi, dependencies, request_context
from taskiq_fastapi._taskiq import install_request_context, require_broker
from taskiq_fastapi.exceptions import (
    AppConflictError,
    AppStartupError,
    DependencyError,
)
from taskiq_fastapi.lifespan import AppLifespan, LifespanFailedError
from taskiq_fastapi.loader import AppSource, describe, import_target, load_app
from taskiq_fastapi.request import RequestFactory, base_url_scope, resolve_base_url

logger = logging.getLogger("taskiq_fastapi")


class _Integration:
    """What `init` registered for one broker, and the app it runs in a worker."""

    def __init__(
        self,
        broker: AsyncBroker,
        source: AppSource,
        base_url: str | None,
    ) -> None:
        self.broker = broker
        self.source = source
        self.base_url = base_url
        self.lifespan: AppLifespan | None = None

    def serves(self, source: AppSource) -> bool:
        """Whether `source` names the app this broker is already wired to."""
        if source is self.source or (isinstance(source, str) and source == self.source):
            return True
        return import_target(source) is import_target(self.source)

    async def on_worker_startup(self, state: TaskiqState) -> None:
        # InMemoryBroker fires worker events in the API process too: the app is
        # already running there, so only a real worker starts it.
        if not self.broker.is_worker_process or self.lifespan is not None:
            return
        app = load_app(self.source)
        dependencies.check(self.broker, carry=request_context.carried(app, self.broker))
        lifespan = AppLifespan(app)
        started = time.monotonic()
        try:
            await lifespan.startup()
        except LifespanFailedError as exc:
            raise AppStartupError(
                f"App {describe(self.source)} failed to start: {exc}",
            ) from exc
        self.lifespan = lifespan
        state.fastapi_app = app
        populate_dependency_context(self.broker, app, lifespan.state)
        # What a worker does with the app: no HTTP server, only its lifespan
        # and dependencies for tasks; the base URL is where links point.
        logger.info(
            "App %s (%r): lifespan started in %.2f s; running its tasks, "
            "url_for builds links for %s.",
            describe(self.source),
            app.title,
            time.monotonic() - started,
            resolve_base_url(self.base_url),
        )

    async def on_worker_shutdown(self, _state: TaskiqState) -> None:
        lifespan, self.lifespan = self.lifespan, None
        if lifespan is None:
            return
        started = time.monotonic()
        try:
            await lifespan.shutdown()
        except LifespanFailedError as exc:
            # Logged, not raised: the broker's other shutdown steps must still run.
            logger.error("App %s failed to shut down: %s", describe(self.source), exc)
            return
        logger.info(
            "App %s: lifespan shut down in %.2f s.",
            describe(self.source),
            time.monotonic() - started,
        )


_integrations: WeakKeyDictionary[AsyncBroker, _Integration] = WeakKeyDictionary()


def init(
    broker: AsyncBroker,
    app_or_path: AppSource,
    *,
    base_url: str | None = None,
) -> None:
    """Run the app's lifespan in the broker's workers and inject Request into tasks.

    `app_or_path` is a uvicorn-style "module:attr" string (imported lazily, at
    worker startup, so the broker and app modules may import each other), a
    FastAPI app, or a zero-argument factory returning one. Outside worker
    processes nothing about sending tasks changes. Calling it again with the
    same app is a no-op; with a different app it raises AppConflictError.
    """
    require_broker("init:", broker)
    if not isinstance(app_or_path, str | FastAPI) and not callable(app_or_path):
        raise TypeError(
            "init: the app must be a FastAPI app, a 'module:attr' string or a "
            f"factory returning the app, not {app_or_path!r}.",
        )
    if base_url is not None and not isinstance(base_url, str):
        raise TypeError(f"init: base_url must be a string, not {base_url!r}.")
    if base_url is not None:
        base_url_scope(base_url)  # reject a malformed URL now, not at startup
    existing = _integrations.get(broker)
    if existing is None:
        problem = _fastapi.unsupported()
        if problem is not None:
            raise DependencyError(problem)
        dependencies.adopt(broker)
        integration = _Integration(broker, app_or_path, base_url)
        _integrations[broker] = integration
        broker.add_event_handler(
            TaskiqEvents.WORKER_STARTUP,
            integration.on_worker_startup,
        )
        broker.add_event_handler(
            TaskiqEvents.WORKER_SHUTDOWN,
            integration.on_worker_shutdown,
        )
        return
    if not existing.serves(app_or_path):
        raise AppConflictError(
            f"The broker is already initialised with app "
            f"{describe(existing.source)}; init was called again with app "
            f"{describe(app_or_path)}. A broker serves one FastAPI app.",
        )
    if base_url is not None:
        existing.base_url = base_url


def app_source(broker: AsyncBroker) -> AppSource | None:
    """The app `init` wired to the broker, if it was called."""
    integration = _integrations.get(broker)
    return None if integration is None else integration.source


def populate_dependency_context(
    broker: AsyncBroker,
    app: FastAPI,
    asgi_state: Mapping[str, Any] | None = None,
    *,
    base_url: str | None = None,
) -> None:
    """Make the broker's tasks receive Request/HTTPConnection for `app`.

    Each task gets a fresh request whose `state` is a shallow copy of
    `asgi_state` (the lifespan state). `init` and `broker_lifespan` call this
    for you; call it by hand only for setups that use neither.
    """
    require_broker("populate_dependency_context:", broker)
    if not callable(app):
        raise TypeError(
            f"populate_dependency_context: app must be the FastAPI app, not {app!r}.",
        )
    integration = _integrations.get(broker)
    if base_url is None and integration is not None:
        base_url = integration.base_url
    factory = RequestFactory(app, asgi_state, resolve_base_url(base_url))
    install_request_context(broker, factory)
    dependencies.adopt(broker)
