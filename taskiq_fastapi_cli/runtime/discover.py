"""Find the broker and the app from their import strings, with exact errors."""

from __future__ import annotations

import inspect
from typing import Any

from fastapi import FastAPI
from taskiq import AsyncBroker, InMemoryBroker
from taskiq.brokers.shared_broker import AsyncSharedBroker

from taskiq_fastapi.exceptions import LoadError
from taskiq_fastapi.loader import (
    call_factory,
    import_module,
    import_string,
    resolve_app,
)


def load_broker(path: str) -> AsyncBroker:
    """Import the broker, calling it when it is a factory function, as taskiq does."""
    broker = import_string(path, "broker", LoadError)
    if inspect.isfunction(broker):
        broker = call_factory(broker, f"broker {path!r}", LoadError)
    if not isinstance(broker, AsyncBroker):
        raise LoadError(
            f"Cannot load broker {path!r}: expected a taskiq broker or a "
            f"function returning one, got {type(broker).__name__}.",
        )
    return broker


# taskiq's brokers whose `listen` only raises, and why no worker can serve them.
_CANNOT_LISTEN: tuple[tuple[Any, str], ...] = (
    (
        InMemoryBroker.listen,
        "an InMemoryBroker runs each task in the process that kicks it, so no "
        "worker can listen to it. Give workers a broker with a server "
        "(taskiq-redis, taskiq-nats, ...).",
    ),
    (
        AsyncSharedBroker.listen,
        "taskiq's shared broker only declares shared tasks, so no worker can "
        "listen to it. Give workers the broker the tasks are kicked to (the "
        "one passed to async_shared_broker.default_broker).",
    ),
)


def unservable(broker: AsyncBroker, path: str) -> str | None:
    """Why no worker can listen to the broker, in one line; None if one can.

    An `InMemoryBroker` (which projects pick for tests, often by an
    environment variable) or taskiq's `async_shared_broker` has a `listen`
    that raises, and taskiq restarted the worker every second with a
    traceback. Told by that `listen` itself, not by the class: a subclass
    that brings its own (fed from a server) is served. Compared by identity,
    not as a dict key: a class's `listen` may be any object, an unhashable
    one too, which made a TypeError traceback here.
    """
    listen = getattr(type(broker), "listen", None)
    why = next((why for raising, why in _CANNOT_LISTEN if listen is raising), None)
    return None if why is None else f"Cannot serve broker {path!r}: {why}"


def check_servable(broker: AsyncBroker, path: str) -> None:
    """Raise `unservable`'s reason, in a worker process that imported the broker."""
    why = unservable(broker, path)
    if why is not None:
        raise LoadError(why)


def check_app(path: str, factory: bool) -> str | None:
    """Check the app path as uvicorn would, never calling a factory.

    The factory runs in each worker process, once: template factories set up
    logging, Sentry and the like, which a supervisor has no use for. With
    `factory`, the path must name a callable returning a FastAPI app; without
    it, a FastAPI app is used as is and a zero-argument callable is used as a
    factory with a warning, as uvicorn does. Returns that warning, if any.
    """
    target = resolve_app(path)
    if not isinstance(target, FastAPI):
        if factory:
            return None
        return (
            f"App factory detected at {path!r}. Using it, but please consider "
            "setting the --factory flag explicitly."
        )
    if factory:
        raise LoadError(
            f"Cannot load app {path!r}: --factory was given, but it is a "
            "FastAPI app, not a factory returning one.",
        )
    return None


def import_task_modules(modules: list[str], pattern: Any, fs_discover: bool) -> None:
    """Import the task modules a worker imports, failing on the first bad one.

    taskiq's worker logs a module it cannot import and goes on with no tasks
    (a syntax error restarts it for ever); here a misspelled or broken module
    stops the command before any worker starts. With `fs_discover`, taskiq's
    own discovery finds the modules, and they are imported the same way.
    """
    discovered = _discovered(pattern) if fs_discover else []
    for module in [*modules, *discovered]:
        import_module(module, "task module")


def _discovered(pattern: Any) -> list[str]:
    """The modules taskiq's `--fs-discover` finds, found by taskiq, not imported.

    taskiq's `import_tasks` adds what it discovers to the list it is given,
    then imports them with `import_from_modules`, which is left out here.
    """
    from taskiq.cli import utils

    found: list[str] = []
    importing = utils.import_from_modules
    utils.import_from_modules = lambda modules: None
    try:
        utils.import_tasks(found, pattern, True)
    finally:
        utils.import_from_modules = importing
    return found
