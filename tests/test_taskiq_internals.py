"""Pins for every taskiq / taskiq-dependencies internal the integration relies on.

If one of these fails after an upgrade, revisit taskiq_fastapi/_taskiq.py
(and taskiq_fastapi_cli's runner) before anything else.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import pickle
import signal
import sys
import time
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI, Request
from taskiq import (
    AsyncBroker,
    Context,
    InMemoryBroker,
    TaskiqDepends,
    TaskiqEvents,
    TaskiqMessage,
    TaskiqMiddleware,
    TaskiqResult,
)
from taskiq.middlewares import SimpleRetryMiddleware, SmartRetryMiddleware
from taskiq.receiver import Receiver
from taskiq_dependencies import DependencyGraph

from taskiq_fastapi._taskiq import (
    GATE,
    RETRY_LABEL,
    PerTaskContext,
    SyncBehindGate,
    cwd_in_sys_path,
    executing,
    gated,
    install_request_context,
    marker_of,
    on_registration,
    replace_task_function,
    set_executing,
    wrap_outermost,
)
from taskiq_fastapi.request import RequestFactory

pytestmark = pytest.mark.anyio


def _factory() -> RequestFactory:
    return RequestFactory(FastAPI(), {}, "http://localhost:8000")


async def test_dependencies_copy_the_initial_cache_once_per_resolution() -> None:
    made: list[Request] = []

    def make(labels: Any) -> Request:
        made.append(_factory()(labels))
        return made[-1]

    def with_request(request: Request = TaskiqDepends()) -> None: ...

    def without_dependencies(x: int = 1) -> None: ...

    cache = PerTaskContext({Context: "ctx"}, make)
    first = await DependencyGraph(with_request).async_ctx(cache).resolve_kwargs()
    second = await DependencyGraph(with_request).async_ctx(cache).resolve_kwargs()
    assert first["request"] is made[0]
    assert second["request"] is made[1]
    # A task without dependencies never pays for a request.
    await DependencyGraph(without_dependencies).async_ctx(cache).resolve_kwargs()
    assert len(made) == 2


async def test_receiver_reads_the_broker_context_for_every_task() -> None:
    broker = InMemoryBroker()
    receiver = broker.receiver
    assert isinstance(receiver, Receiver)

    @broker.task
    async def title(request: Request = TaskiqDepends()) -> str:
        return str(request.app.title)

    # Installed after the receiver was built, as the worker startup does.
    factory = RequestFactory(FastAPI(title="pinned"), {}, "http://localhost:8000")
    install_request_context(broker, factory)
    await broker.startup()
    result = await (await title.kiq()).wait_result(timeout=5)
    await broker.shutdown()
    assert result.return_value == "pinned"
    assert broker.dependency_overrides == {}


async def test_receiver_writes_each_tasks_context_with_update_before_resolving() -> (
    None
):
    """PerTaskContext keeps each task's own Context from the receiver's `update`."""
    broker = InMemoryBroker()
    announced: list[Any] = []

    class Watching(PerTaskContext):
        def update(self, *args: Any, **kwargs: Any) -> None:
            super().update(*args, **kwargs)
            announced.append(self[Context].message.task_id)

    @broker.task
    async def task_id(context: Context = TaskiqDepends()) -> str:
        return context.message.task_id

    broker.custom_dependency_context = Watching({}, _factory())
    await broker.startup()
    kicked = await task_id.kiq()
    result = await kicked.wait_result(timeout=5)
    await broker.shutdown()
    assert announced == [kicked.task_id] == [result.return_value]


def test_add_cwd_in_path_puts_the_working_directory_first() -> None:
    cwd = os.getcwd()
    saved = list(sys.path)
    try:
        while cwd in sys.path:
            sys.path.remove(cwd)
        with cwd_in_sys_path():
            assert sys.path[0] == cwd
    finally:
        sys.path[:] = saved


def test_install_keeps_existing_context_entries() -> None:
    broker = InMemoryBroker()
    broker.add_dependency_context({int: 5})
    install_request_context(broker, _factory())
    install_request_context(broker, _factory())
    context: Any = broker.custom_dependency_context
    assert isinstance(context, PerTaskContext)
    assert context[int] == 5


def test_run_worker_starts_processes_with_the_module_level_start_listen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """taskiq_fastapi_cli.runtime.runner swaps `start_listen` for the call's duration."""
    from taskiq.cli.worker import run as taskiq_run

    from taskiq_fastapi_cli.runtime import runner
    from taskiq_fastapi_cli.runtime.args import parse_taskiq_args

    seen: list[object] = []

    class FakeProcessManager:
        def __init__(self, args: Any, worker_function: Any, observer: Any) -> None:
            seen.append(worker_function)

        def start(self) -> None:
            return None

    monkeypatch.setattr(taskiq_run, "ProcessManager", FakeProcessManager)
    args = parse_taskiq_args(["b:b", "--no-configure-logging"])
    with runner._taskiq_run_uses(start_listen=runner.worker_process):
        assert taskiq_run.run_worker(args) is None
    assert seen == [runner.worker_process]
    assert taskiq_run.start_listen is runner.taskiq_start_listen


def test_run_worker_creates_the_module_level_process_manager(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """runner swaps in SafeProcessManager by the module-level name."""
    from taskiq.cli.worker import run as taskiq_run

    created: list[object] = []

    class Probe:
        def __init__(self, **kwargs: Any) -> None:
            created.append(kwargs)

        def start(self) -> None:
            return None

    monkeypatch.setattr(taskiq_run, "ProcessManager", Probe)
    from taskiq_fastapi_cli.runtime.args import parse_taskiq_args

    taskiq_run.run_worker(parse_taskiq_args(["b:b", "--no-configure-logging"]))
    assert len(created) == 1


def sleep_a_minute(args: Any) -> None:
    from taskiq_fastapi_cli.runtime.supervisor import release_stop_signals

    release_stop_signals()  # as worker_process does: a SIGINT stops it
    time.sleep(60)


@pytest.mark.timeout(60)
def test_taskiq_manager_loop_acts_on_what_our_action_queue_says() -> None:
    """taskiq's loop reads the manager's `action_queue` through empty()/get().

    Pinned by behaviour: a failure reported on our channel (which only our
    queue's empty()/get() turn into a shutdown) ends taskiq's own loop, and
    the worker it started is stopped, long before it would end by itself.
    """
    from taskiq_fastapi_cli.runtime.args import parse_taskiq_args, with_app
    from taskiq_fastapi_cli.runtime.runner import Failures
    from taskiq_fastapi_cli.runtime.shutdown import StopStage
    from taskiq_fastapi_cli.runtime.supervisor import SafeProcessManager

    args = with_app(parse_taskiq_args(["b:b", "--workers", "1"]), "", None)
    args.failures, args.stop_stage = Failures(), StopStage()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    hup = signal.getsignal(signal.SIGHUP)
    try:
        manager = SafeProcessManager(args, worker_function=sleep_a_minute)
        args.failures.report("a worker failed")
        started = time.monotonic()
        manager.start()
        assert time.monotonic() - started < 30
        assert not manager.workers[0].is_alive()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        signal.signal(signal.SIGHUP, hup)


def test_start_listen_imports_the_broker_through_the_run_modules_import_object() -> (
    None
):
    """taskiq_fastapi_cli.runtime.runner makes that import return the broker it initialised."""
    import subprocess
    import sys

    probe = (
        "from taskiq import InMemoryBroker\n"
        "from taskiq_fastapi_cli.runtime import runner\n"
        "from taskiq_fastapi_cli.runtime.args import parse_taskiq_args\n"
        "from taskiq_fastapi_cli.runtime.shutdown import ShutdownGuard\n"
        "broker = InMemoryBroker()\n"
        "args = parse_taskiq_args(['not.a.module:broker', '--no-configure-logging'])\n"
        "try:\n"
        "    runner._listen(args, broker, ShutdownGuard(broker))\n"
        "except BaseException as exc:\n"
        "    inner = getattr(exc, 'exceptions', [exc])[0]\n"
        "    print(broker.is_worker_process, inner)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    # The instance was used (the path would not import), up to listening.
    assert result.stdout.strip() == "True Inmemory brokers cannot listen.", (
        result.stdout + result.stderr
    )


def test_every_registration_goes_through_register_task() -> None:
    broker = InMemoryBroker()
    seen: list[str] = []
    on_registration(broker, lambda task: seen.append(task.task_name))

    @broker.task
    async def decorated() -> None: ...

    async def registered() -> None: ...

    broker.register_task(registered, task_name="by-hand")
    assert seen == [decorated.task_name, "by-hand"]


async def test_the_receiver_builds_its_graph_from_and_calls_original_func() -> None:
    broker = InMemoryBroker()

    @broker.task
    async def task(n: int) -> str:
        return "original"

    def value() -> str:
        return "from a dependency"

    async def replacement(n: int, extra: str = TaskiqDepends(value)) -> str:
        return f"{n} {extra}"

    replace_task_function(task, replacement)
    await broker.startup()
    result = await (await task.kiq(1)).wait_result(timeout=5)
    await broker.shutdown()
    assert result.return_value == "1 from a dependency"


def marker_a() -> int: ...


def marker_b() -> int: ...


def two_markers(
    x: Annotated[int, TaskiqDepends(marker_a), Depends(marker_b)] = TaskiqDepends(
        marker_a
    ),
) -> None: ...


def test_taskiq_dependencies_reads_a_signature_attribute_and_markers_like_this() -> (
    None
):
    # The last marker in Annotated wins over the default, in taskiq-dependencies.
    (parameter,) = inspect.signature(two_markers, eval_str=True).parameters.values()
    assert marker_of(parameter).dependency is marker_b
    graph = DependencyGraph(two_markers)
    assert [d.dependency for d in graph.ordered_deps] == [marker_b, two_markers]

    def stand_in(**kwargs: Any) -> None: ...

    stand_in.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(
                "y", inspect.Parameter.KEYWORD_ONLY, default=TaskiqDepends(marker_a)
            )
        ]
    )
    graph = DependencyGraph(stand_in)
    assert [d.dependency for d in graph.ordered_deps] == [marker_a, stand_in]


async def test_the_request_is_made_with_the_labels_of_the_task_being_resolved() -> None:
    """The receiver puts the task's Context in the cache before copying it."""
    broker = InMemoryBroker()
    seen: list[Any] = []

    def make(labels: Any) -> Request:
        seen.append(dict(labels))
        return _factory()(labels)

    @broker.task
    async def with_request(request: Request = TaskiqDepends()) -> None: ...

    install_request_context(broker, make)
    await broker.startup()
    for n in range(3):
        task = await with_request.kicker().with_labels(n=str(n)).kiq()
        await task.wait_result(timeout=5)
    await broker.shutdown()
    assert [labels["n"] for labels in seen] == ["0", "1", "2"]


async def test_pre_execute_and_the_function_share_a_context_and_labels_reach_the_result(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What cancel.py relies on: a context variable set by a sync pre_execute
    is seen by the task's function, labels it adds to its message are saved
    with its result, and the receiver logs a task's exception under
    RECEIVER_LOGGER."""
    from taskiq import TaskiqMiddleware

    from taskiq_fastapi._taskiq import RECEIVER_LOGGER, executing, set_executing

    class Names(TaskiqMiddleware):
        def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
            set_executing(message)
            return message

    broker = InMemoryBroker().with_middlewares(Names())

    @broker.task
    async def task() -> str:
        message = executing()
        assert message is not None
        message.labels["seen"] = "yes"
        raise ValueError(message.task_id)

    await broker.startup()
    kicked = await task.kiq()
    result = await kicked.wait_result(timeout=5)
    await broker.shutdown()
    assert result.labels["seen"] == "yes"
    assert str(result.error) == kicked.task_id
    assert [r.name for r in caplog.records if r.exc_info] == [RECEIVER_LOGGER]


def test_taskiqs_instrumentor_replaces_start_listen_which_the_runner_honours() -> None:
    """taskiq 0.12+'s TaskiqInstrumentor puts its own `start_listen` in the run
    module (runner.py's `_start_listen` runs it); 0.11 has no instrumentor."""
    from importlib.metadata import version

    import taskiq.cli.worker.run as taskiq_run

    from taskiq_fastapi.tracing import FIRST_TASKIQ, _release

    if _release(version("taskiq")) < FIRST_TASKIQ:
        with pytest.raises(ImportError):
            import taskiq.instrumentation  # noqa: F401
        return
    from taskiq.instrumentation import TaskiqInstrumentor

    original = taskiq_run.start_listen
    instrumentor = TaskiqInstrumentor()
    instrumentor.instrument()
    try:
        assert taskiq_run.start_listen is not original
        assert TaskiqInstrumentor._original_start_listen is original
    finally:
        instrumentor.uninstrument()
        # Its uninstrument puts back a method bound to the instrumentor.
        taskiq_run.start_listen = original


def gate_leaf() -> None: ...


def setup_leaf() -> int:
    return 1


def setup_parent(leaf: int = TaskiqDepends(setup_leaf)) -> int:
    return leaf + 1


async def test_a_parameterless_dependency_declared_first_is_resolved_first() -> None:
    """What `gated` relies on: taskiq-dependencies resolves the first batch of
    its topological order (dependencies without parameters) in the order the
    task declares them, so the gate comes before every other dependency, at
    any depth, and what it raises leaves nothing set up."""
    set_up: list[str] = []

    def held() -> Any:
        set_up.append("held")
        yield "held"

    def task(
        parent: int = TaskiqDepends(setup_parent),
        leaf: int = TaskiqDepends(setup_leaf),
        resource: Any = TaskiqDepends(held),
        context: Context = TaskiqDepends(),
    ) -> None: ...

    def stand_in(**kwargs: Any) -> None: ...

    stand_in.__signature__ = gated(task, gate_leaf)  # type: ignore[attr-defined]
    graph = DependencyGraph(stand_in)
    order = [d.dependency for d in graph.ordered_deps]
    assert order[0] is gate_leaf
    assert order[-1] is stand_in
    assert set(order[1:-1]) == {setup_parent, setup_leaf, held, Context}

    class StopError(Exception): ...

    def stopping_gate() -> None:
        raise StopError

    stand_in.__signature__ = gated(task, stopping_gate)  # type: ignore[attr-defined]
    context = DependencyGraph(stand_in).async_ctx({Context: "ctx"})
    with pytest.raises(StopError):
        await context.resolve_kwargs()
    await context.close()
    assert set_up == []
    stand_in.__signature__ = gated(task, gate_leaf)  # type: ignore[attr-defined]
    resolved = (
        await DependencyGraph(stand_in).async_ctx({Context: "ctx"}).resolve_kwargs()
    )
    assert resolved == {
        GATE: None,
        "parent": 2,
        "leaf": 1,
        "resource": "held",
        "context": "ctx",
    }


async def test_a_gated_task_keeps_its_positional_arguments_and_their_types() -> None:
    """The gate is keyword-only, first: taskiq still maps and parses a
    message's positional arguments by position."""
    broker = InMemoryBroker()

    @broker.task
    async def task(n: int, m: int = 0, context: Context = TaskiqDepends()) -> str:
        return f"{n!r} {m!r} {context.message.task_name}"

    function = task.original_func

    async def behind(*args: Any, **kwargs: Any) -> Any:
        assert kwargs.pop(GATE) is None
        return await function(*args, **kwargs)

    behind.__signature__ = gated(function, gate_leaf)  # type: ignore[attr-defined]
    behind.__annotations__ = function.__annotations__
    replace_task_function(task, behind)
    await broker.startup()
    result = await (await task.kiq("3", "4")).wait_result(timeout=5)
    await broker.shutdown()
    assert result.return_value == f"3 4 {task.task_name}"


def add_one(n: int) -> int:
    return n + 1


_pool_broker = InMemoryBroker()
pooled_add_one = _pool_broker.task(add_one)


def test_a_gated_sync_task_pickles_as_its_own_function() -> None:
    """taskiq's `worker --use-process-pool` pickles the function it calls
    (taskiq 0.13 does; 0.11.20 pickled a contextvars.Context, which failed for
    every sync task): a sync task's own one pickles by name, taskiq putting
    it in its module, and a gated one pickles as that."""
    wrap_outermost(pooled_add_one, lambda f: SyncBehindGate(f, gate_leaf))
    sent = pickle.dumps(pooled_add_one.original_func)
    assert b"SyncBehindGate" not in sent
    assert pickle.loads(sent)(41, **{GATE: None}) == 42


async def test_pre_execute_dependencies_and_function_run_in_one_asyncio_task() -> None:
    """What cancel.py relies on to stop a running task from its pre_execute on."""
    seen: list[Any] = []

    class Tasks(TaskiqMiddleware):
        def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
            seen.append(asyncio.current_task())
            return message

    broker = InMemoryBroker().with_middlewares(Tasks())

    async def dependency() -> Any:
        seen.append(asyncio.current_task())
        yield

    @broker.task
    async def task(held: None = TaskiqDepends(dependency)) -> None:
        seen.append(asyncio.current_task())

    await broker.startup()
    await (await task.kiq()).wait_result(timeout=5)
    await broker.shutdown()
    assert len(seen) == 3
    assert seen[0] is not None
    assert seen[0] is seen[1] is seen[2]


async def test_a_results_labels_are_a_copy_of_its_messages() -> None:
    """So cancel.py's on_error writes the result's labels itself."""

    class Late(TaskiqMiddleware):
        def on_error(
            self, message: TaskiqMessage, result: TaskiqResult[Any], exc: BaseException
        ) -> None:
            message.labels["late"] = "message"
            result.labels["own"] = "result"

    broker = InMemoryBroker().with_middlewares(Late())

    @broker.task
    async def task() -> None:
        raise ValueError

    await broker.startup()
    result = await (await task.kiq()).wait_result(timeout=5)
    await broker.shutdown()
    assert result.labels["own"] == "result"
    assert "late" not in result.labels


@pytest.mark.parametrize("switched_off", [False, True])
@pytest.mark.parametrize("retry", [SimpleRetryMiddleware, SmartRetryMiddleware])
async def test_taskiqs_retry_middlewares_read_the_retry_label_from_the_message(
    retry: Any, switched_off: bool
) -> None:
    """What cancel.py sets to keep a cancelled task from being retried."""

    class Names(TaskiqMiddleware):
        def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
            set_executing(message)
            return message

    options = {"default_delay": 0} if retry is SmartRetryMiddleware else {}
    broker = InMemoryBroker().with_middlewares(
        Names(), retry(default_retry_count=2, **options)
    )
    runs: list[str] = []

    @broker.task(**{RETRY_LABEL: True})
    async def failing() -> None:
        runs.append("ran")
        message = executing()
        assert message is not None
        if switched_off:
            message.labels[RETRY_LABEL] = False
        raise ValueError

    await broker.startup()
    await failing.kiq()
    await asyncio.sleep(0.5)
    await broker.shutdown()
    assert len(runs) == (1 if switched_off else 2)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["taskiq's own shutdown", "InMemoryBroker's"])
async def test_the_first_shutdown_handler_is_ours_while_noted(kind: str) -> None:
    """`shutdown_handlers_noted` relies on taskiq running `event_handlers` in
    order: its note must come before the broker's own handlers, and be gone
    after the block."""
    from taskiq_fastapi._taskiq import shutdown_handlers_noted

    class BaseShutdown(InMemoryBroker):
        shutdown = AsyncBroker.shutdown  # what taskiq-redis' brokers inherit

    broker = BaseShutdown() if kind == "taskiq's own shutdown" else InMemoryBroker()
    seen: list[bool] = []
    broker.add_event_handler(
        TaskiqEvents.CLIENT_SHUTDOWN, lambda _state: seen.append(bool(begun))
    )
    with shutdown_handlers_noted(broker) as begun:
        await broker.shutdown()
    assert seen == [True]
    assert len(broker.event_handlers[TaskiqEvents.CLIENT_SHUTDOWN]) == 1
