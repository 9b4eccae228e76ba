"""`init`: app sources, failures at startup, idempotence (issue 2, items 1, 3, 6)."""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable

import pytest
from conftest import as_worker
from fastapi import FastAPI, Request
from sampleapp import apps
from taskiq import InMemoryBroker, TaskiqDepends, TaskiqEvents

import taskiq_fastapi
from taskiq_fastapi import AppConflictError, AppLoadError, AppStartupError

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "source",
    ["sampleapp.apps:app", "sampleapp.apps:Nested.app", apps.app],
    ids=["path", "dotted-path", "instance"],
)
async def test_app_sources(broker: InMemoryBroker, source: object) -> None:
    taskiq_fastapi.init(broker, source)  # type: ignore[arg-type]
    async with as_worker(broker):
        assert broker.state.fastapi_app is apps.app
    assert apps.events[-1] == "shutdown"


@pytest.mark.parametrize("source", ["sampleapp.apps:create_app", apps.create_app])
async def test_factory_is_called_once_per_worker(
    broker: InMemoryBroker, source: object
) -> None:
    taskiq_fastapi.init(broker, source)  # type: ignore[arg-type]
    async with as_worker(broker):
        assert isinstance(broker.state.fastapi_app, FastAPI)
        assert broker.state.fastapi_app is not apps.app
    assert apps.events.count("factory called") == 1


async def test_outside_a_worker_sending_is_unchanged(broker: InMemoryBroker) -> None:
    before = broker.custom_dependency_context
    overrides = dict(broker.dependency_overrides)
    taskiq_fastapi.init(broker, "sampleapp.apps:app")

    @broker.task
    async def add(a: int, b: int) -> int:
        return a + b

    await broker.startup()  # InMemoryBroker fires worker events here too
    task = await add.kiq(1, 2)
    assert (await task.wait_result(timeout=5)).return_value == 3
    await broker.shutdown()
    # Nothing ran the app, nothing was injected, nothing was overridden.
    assert apps.events == []
    assert broker.custom_dependency_context is before
    assert broker.dependency_overrides == overrides


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "sampleapp.missing:app",
            "Cannot load app 'sampleapp.missing:app': "
            'Could not import module "sampleapp.missing".',
        ),
        (
            "sampleapp.apps:nope",
            "Cannot load app 'sampleapp.apps:nope': "
            'Attribute "nope" not found in module "sampleapp.apps".',
        ),
        (
            "sampleapp.apps",
            "Cannot load app 'sampleapp.apps': Import string \"sampleapp.apps\" "
            'must be in format "<module>:<attribute>".',
        ),
        (
            "sampleapp.broken_import:app",
            "Cannot load app 'sampleapp.broken_import:app': importing it raised "
            "ModuleNotFoundError: No module named 'this_dependency_is_not_installed'",
        ),
        (
            "sampleapp.apps:not_an_app",
            "Cannot load app 'sampleapp.apps:not_an_app': expected a FastAPI app "
            "or a zero-argument factory returning one, got int.",
        ),
        (
            "sampleapp.apps:plain_asgi_app",
            "Cannot load app 'sampleapp.apps:plain_asgi_app': expected a FastAPI "
            "app or a zero-argument factory returning one, got function.",
        ),
        (
            "sampleapp.apps:raising_factory",
            "Cannot load app 'sampleapp.apps:raising_factory': the factory raised "
            "ValueError: missing setting",
        ),
        (
            "sampleapp.apps:wrong_factory",
            "Cannot load app 'sampleapp.apps:wrong_factory': the factory returned "
            "dict, not a FastAPI app.",
        ),
    ],
)
async def test_load_failures_are_raised_from_worker_startup(
    broker: InMemoryBroker, source: str, message: str
) -> None:
    taskiq_fastapi.init(broker, source)
    broker.is_worker_process = True
    with pytest.raises(AppLoadError) as caught:
        await broker.startup()
    assert str(caught.value) == message
    assert broker.custom_dependency_context == {}
    assert not hasattr(broker.state, "fastapi_app")


async def test_lifespan_failure_names_app_and_cause(broker: InMemoryBroker) -> None:
    taskiq_fastapi.init(broker, "sampleapp.apps:failing_app")
    broker.is_worker_process = True
    with pytest.raises(AppStartupError) as caught:
        await broker.startup()
    assert str(caught.value) == (
        "App 'sampleapp.apps:failing_app' failed to start: "
        "RuntimeError: database is down"
    )
    # No partial state: nothing injected, nothing to shut down, nothing left running.
    assert broker.custom_dependency_context == {}
    assert not hasattr(broker.state, "fastapi_app")
    await broker.shutdown()
    lifespan_tasks = [
        t
        for t in __import__("asyncio").all_tasks()
        if t.get_name() == "fastapi-lifespan"
    ]
    assert lifespan_tasks == []


async def test_init_twice_with_the_same_app_registers_one_lifespan(
    broker: InMemoryBroker,
) -> None:
    taskiq_fastapi.init(broker, "sampleapp.apps:app")
    taskiq_fastapi.init(broker, "sampleapp.apps:app")
    taskiq_fastapi.init(broker, apps.app)  # the same app, named differently
    assert len(broker.event_handlers[TaskiqEvents.WORKER_STARTUP]) == 1
    assert len(broker.event_handlers[TaskiqEvents.WORKER_SHUTDOWN]) == 1
    async with as_worker(broker):
        pass
    assert apps.events.count("startup") == 1
    assert apps.events.count("shutdown") == 1


async def test_init_with_another_app_is_refused(broker: InMemoryBroker) -> None:
    taskiq_fastapi.init(broker, "sampleapp.apps:app")
    with pytest.raises(AppConflictError) as caught:
        taskiq_fastapi.init(broker, "sampleapp.apps:failing_app")
    assert str(caught.value) == (
        "The broker is already initialised with app 'sampleapp.apps:app'; init "
        "was called again with app 'sampleapp.apps:failing_app'. "
        "A broker serves one FastAPI app."
    )
    other = FastAPI(title="Other")
    with pytest.raises(AppConflictError, match=re.escape("FastAPI app 'Other'")):
        taskiq_fastapi.init(broker, other)


def test_malformed_base_url_is_refused_at_init(broker: InMemoryBroker) -> None:
    with pytest.raises(ValueError, match=re.escape("Invalid base URL 'ftp://x'")):
        taskiq_fastapi.init(broker, apps.app, base_url="ftp://x")


@pytest.mark.parametrize(
    "base_url",
    [
        "http://deploy:pa/s3cret@api.example.com",  # urllib: port 'pa'
        "http://deploy:s3cr\u2100et@api.example.com",  # urllib: NFKC, netloc quoted
        "http://deploy:s3cret@[::1/",  # urllib: Invalid IPv6 URL
    ],
)
def test_no_part_of_a_password_is_in_the_refusal_or_its_traceback(
    broker: InMemoryBroker, base_url: str
) -> None:
    """The URL was masked in the message, but urllib's own words quoted the
    port (the password up to a "/") or the whole netloc, in the message and
    in the chained exception a traceback prints."""
    with pytest.raises(ValueError, match=re.escape("'http://***@")) as refused:
        taskiq_fastapi.init(broker, apps.app, base_url=base_url)
    shown = "".join(traceback.format_exception(refused.value))
    assert "s3cr" not in shown
    assert "'pa'" not in shown


async def test_request_parameter_without_init_is_untouched(
    broker: InMemoryBroker,
) -> None:
    # Control: without the integration taskiq cannot build a Request, which is
    # what the injection tests rely on to prove injection happened.
    @broker.task
    async def needs_request(request: Request = TaskiqDepends()) -> str:
        return "unreachable"  # pragma: no cover

    async with as_worker(broker):
        task = await needs_request.kiq()
        result = await task.wait_result(timeout=5)
    assert result.is_err


def wrong_calls() -> list[tuple[Callable[[], object], str]]:
    """Each public entry point given a value of the wrong kind, and its error."""
    broker = InMemoryBroker()
    return [
        (lambda: taskiq_fastapi.init(None, apps.app),  # type: ignore[arg-type]
         "init: broker must be a taskiq broker, not None."),
        (lambda: taskiq_fastapi.init(broker, 123),  # type: ignore[arg-type]
         "init: the app must be a FastAPI app, a 'module:attr' string or a "
         "factory returning the app, not 123."),
        (lambda: taskiq_fastapi.init(broker, apps.app, base_url=8000),  # type: ignore[arg-type]
         "init: base_url must be a string, not 8000."),
        (lambda: taskiq_fastapi.populate_dependency_context(broker, "sampleapp.apps:app"),  # type: ignore[arg-type]
         "populate_dependency_context: app must be the FastAPI app, not "
         "'sampleapp.apps:app'."),
        (lambda: taskiq_fastapi.broker_lifespan(None),  # type: ignore[arg-type]
         "broker_lifespan: broker must be a taskiq broker, not None."),
        (lambda: taskiq_fastapi.broker_lifespan(broker, 5),  # type: ignore[arg-type]
         "broker_lifespan: lifespan must be the app's lifespan function or None, "
         "not 5."),
    ]  # fmt: skip


@pytest.mark.parametrize("index", range(len(wrong_calls())))
def test_a_value_of_the_wrong_kind_is_one_clear_error_at_once(index: int) -> None:
    """They were taken and failed later, in a worker or at the app's startup
    (an app of 123, a lifespan of 5), or raised "cannot create weak
    reference" and "'int' object has no attribute 'partition'"."""
    call, error = wrong_calls()[index]
    with pytest.raises(TypeError) as raised:
        call()
    assert str(raised.value) == error
