"""Turn what `init` was given (import string, app or factory) into a FastAPI app."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any, TypeAlias

from fastapi import FastAPI

from taskiq_fastapi._taskiq import cwd_in_sys_path
from taskiq_fastapi.exceptions import AppLoadError, LoadError

AppSource: TypeAlias = "str | FastAPI | Callable[[], FastAPI]"


def describe(source: object) -> str:
    """Name an app source the way a user wrote it, for error messages."""
    if isinstance(source, str):
        return repr(source)
    if inspect.isfunction(source) or inspect.isclass(source):
        return repr(f"{source.__module__}:{source.__qualname__}")
    if isinstance(source, FastAPI):
        return f"FastAPI app {source.title!r}"
    return repr(source)


def import_string(
    path: str,
    what: str = "app",
    error: type[LoadError] = AppLoadError,
) -> Any:
    """Import a `module:attr` string with uvicorn's importer.

    Imports see the current directory, as taskiq's own imports of the broker
    do; failures raise `error` naming `what`, the path and the cause.
    """
    from uvicorn.importer import import_from_string

    try:
        with cwd_in_sys_path():
            return import_from_string(path)
    except (KeyboardInterrupt, SystemExit):
        raise  # a stop asked for, not a broken module
    except BaseException as exc:  # asyncio.CancelledError, too, is one line
        raise error(f"Cannot load {what} {path!r}: {_why(path, exc)}") from exc


def import_module(name: str, what: str) -> None:
    """Import a module by name as taskiq imports task modules, or raise LoadError."""
    try:
        with cwd_in_sys_path():
            importlib.import_module(name)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        raise LoadError(f"Cannot load {what} {name!r}: {_why(name, exc)}") from exc


def _why(path: str, exc: BaseException) -> str:
    from uvicorn.importer import ImportFromStringError

    if isinstance(exc, ImportFromStringError):
        return str(exc)
    module = path.partition(":")[0]
    if (
        isinstance(exc, ModuleNotFoundError)
        and exc.name
        and f"{module}.".startswith(f"{exc.name}.")
    ):
        # A missing parent package: the path itself is wrong, not its code.
        return f'Could not import module "{module}".'
    said = f": {exc}" if str(exc) else ""  # a bare CancelledError says nothing
    return f"importing it raised {type(exc).__name__}{said}"


def import_target(source: AppSource) -> Any:
    """The object an app source names: import strings are imported."""
    return import_string(source) if isinstance(source, str) else source


def needs_arguments(target: Callable[..., Any]) -> bool:
    """Whether calling `target()` would fail for lack of arguments."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return False
    return any(
        p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p in signature.parameters.values()
    )


def call_factory(
    factory: Callable[[], Any],
    what: str,
    error: type[LoadError] = AppLoadError,
) -> Any:
    """Call a factory; its failure becomes `error` naming `what` and the cause."""
    try:
        return factory()
    except Exception as exc:
        raise error(
            f"Cannot load {what}: the factory raised {type(exc).__name__}: {exc}",
        ) from exc


def resolve_app(source: AppSource) -> FastAPI | Callable[[], Any]:
    """What an app source names, checked: an app, or a factory not yet called.

    Checking without calling lets a process that serves nothing (the CLI's
    supervisor) reject a bad path without running a factory's side effects.
    """
    target = import_target(source)
    if isinstance(target, FastAPI):
        return target
    if not callable(target) or needs_arguments(target):
        raise AppLoadError(
            f"Cannot load app {describe(source)}: expected a FastAPI app or a "
            f"zero-argument factory returning one, got {type(target).__name__}.",
        )
    return target  # type: ignore[no-any-return]


def load_app(source: AppSource) -> FastAPI:
    """Resolve a source to an app: an app is used as is, a callable is a factory."""
    target = resolve_app(source)
    if isinstance(target, FastAPI):
        return target
    app = call_factory(target, f"app {describe(source)}")
    if not isinstance(app, FastAPI):
        raise AppLoadError(
            f"Cannot load app {describe(source)}: the factory returned "
            f"{type(app).__name__}, not a FastAPI app.",
        )
    return app
