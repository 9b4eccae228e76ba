"""Broker outages: a worker process waits for its broker instead of dying.

Upstream behaviours worked around here:

- taskiq's receiver lets an exception from the broker's fetch (or startup)
  end the worker process, with a traceback; its supervisor starts a new one,
  which runs the app's lifespan again, and with the broker down does so about
  once a second, for ever.
- redis-py 8 gives connections a 5 s socket timeout by default, and a
  client's blocking fetch may end with its TimeoutError while idle (taskiq-
  redis's `ListQueueBroker` did, every 5 s, before its BRPOP got a server-
  side timeout: `_brokers.fetch_without_client_timeout`). A fetch that times
  out after waiting is an idle wait, not an outage, if the server answers a
  PING: it is started again at once, logged at DEBUG.
- After a restart of the server, every connection a pool kept from before
  fails once, and taskiq-redis's pools do not retry: the first results after
  an outage were lost ("Can't set result in result backend"). Saving a result
  and acknowledging a message are retried the same way as fetching.

- A server that restarted without its data (Redis without persistence, NATS
  without its store): taskiq-redis's stream broker and taskiq-nats create
  their consumer group, stream, consumer and bucket only at startup, and
  every fetch then failed. `taskiq_fastapi._brokers.LostState` recreates them
  in place, one WARNING line; pooled Redis connections the server closed are
  renewed before use (`renew_closed_connections`).

Retried: connection-type errors, as `taskiq_fastapi.connections` tells them
(the API process's `broker_lifespan` uses the same rule), and any error of
the broker's fetch: taskiq ended the worker process with a traceback, and
its supervisor started another, over and over, for an error that stays (a
Redis key of the wrong type: WRONGTYPE) or passes (a replica that became
read-only in a failover: READONLY). Such a failure runs the broker's clock
as an outage does ("failing" where an outage says "unreachable"). So does a
result save's or an acknowledgement's READONLY or TRYAGAIN (`_passes`);
their other errors keep taskiq's behaviour: they are one task's. Retries
back off exponentially with jitter, one WARNING line each (at most one a
second per dependency), and one line when it is back. The broker and the
result backend each have one clock (`Dependency`), from the first failed
attempt to the next success; past `--broker-retry-timeout` the process asks
the whole command to stop gracefully and the command exits 3, naming which
one and the real duration.

- A server that accepts connections and never answers: redis-py and nats-py
  then wait for ever (redis-py with `socket_timeout=None`, as a blocking
  BRPOP wants; nats-py's fetch times out and looks idle). An operation that
  has waited a while has its server PINGed with a deadline (`_watch`); no
  answer is a failed attempt, an answer ends an outage, so "back" is logged
  and readiness restored while the worker is idle. At the give-up, a result
  save or ack still waiting is cancelled until it ends (a client may swallow
  one cancellation, as below).
- taskiq acknowledges a `when_saved` message whose result it failed to save:
  once the result backend is given up on, acknowledgements are skipped.

- Broker clients that retry connecting on their own inside the broker's
  startup: nats-py tries 60 times, 2 s apart, before it raises, so a
  `--broker-retry-timeout` shorter than that was never applied. Once the
  worker's startup handlers (the app's lifespan) are done, the rest of the
  broker's startup is bounded by the retry timeout too. At the deadline it
  is cancelled until it ends: before Python 3.12 nats-py can swallow one
  cancellation (`cancel_until_done`).
- A broker whose startup never connected, or whose server is gone, may fail
  to shut down: taskiq-nats closes its client first, which raises for a
  client that never connected or lost its server,
  and so never ran the shutdown handlers, the app's lifespan among them
  (taskiq then logged the error with a traceback). Then the handlers run
  through taskiq's base `AsyncBroker.shutdown`, and the error is logged at
  DEBUG: the process is stopping because the broker was unreachable.
- nats-py logs each failed connection attempt with a full traceback (its
  default error callback). In worker processes those records keep their
  message and cause, on one line, without the traceback.

Per message, a fetch passes through one more generator and an ackable
message gets its ack wrapped; each fetch, ack and result save notes when it
started (one clock read, one dict entry); the retries and PINGs only run on
failures and long waits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
)
from typing import Any, TypeVar

from taskiq import AckableMessage, AsyncBroker, TaskiqEvents, TaskiqState
from taskiq.utils import maybe_awaitable

from taskiq_fastapi._brokers import (
    LostState,
    fetch_without_client_timeout,
    pinger,
    renew_closed_connections,
)
from taskiq_fastapi._taskiq import with_ack
from taskiq_fastapi.connections import (
    backoff,
    cancel_until_done,
    describe,
    is_connection_error,
    one_line,
    refuses_credentials,
)
from taskiq_fastapi.exceptions import TaskiqFastAPIError

logger = logging.getLogger("taskiq_fastapi")

FIRST_DELAY_SECONDS = 0.5
MAX_DELAY_SECONDS = 30.0
# A fetch that waited this long before timing out was idle, not cut off...
IDLE_WAIT_SECONDS = 1.0
# ...if its server answers a PING within this.
PING_TIMEOUT_SECONDS = 2.0
# An operation under way this long has its server pinged, and again as long
# as it lasts; at most a quarter of the retry timeout, so that a server that
# never answers is found out well before the deadline.
PROBE_SECONDS = 5.0
PROBE_FLOOR_SECONDS = 0.25  # with --broker-retry-timeout 0, no busy loop
# Retry lines of one dependency: at most one a second (many tasks may retry
# at once), one per attempt otherwise.
LOG_EVERY_SECONDS = 1.0
T = TypeVar("T")


class BrokerStartupError(TaskiqFastAPIError):
    """The broker could not start, or stayed unreachable for too long."""


class WorkerStopped(Exception):  # noqa: N818 - a stop, not an error
    """A signal stopped the worker while it waited for its broker."""


def _backoff(attempt: int) -> float:
    return backoff(attempt, FIRST_DELAY_SECONDS, MAX_DELAY_SECONDS)


def _state(exc: BaseException) -> str:
    """How a dependency whose attempt raised `exc` is said to be."""
    return "unreachable" if is_connection_error(exc) else "failing"


class Dependency:
    """The broker, or the result backend: one clock for its outages.

    The clock runs from the first failed attempt (connect, fetch, ack, result
    save, or a PING while one of them waits) to the next success, whichever
    operation it was; past the retry timeout the command gives up, naming
    this dependency and how long it really was unreachable. Costs nothing
    per operation while no outage runs beyond noting when each one started.
    """

    def __init__(
        self,
        name: str,
        owner: object,
        retry_timeout: float,
        report: Callable[[bool], None],
    ) -> None:
        self.name = name
        self.retry_timeout = retry_timeout
        self.report = report
        self.owner = owner
        # Within the time between two PINGs, so that they come at a steady rate.
        self.ping_timeout = min(PING_TIMEOUT_SECONDS, self.probe_every())
        self.since: float | None = None
        # Failed attempts per operation (a token each), for its own backoff:
        # counted together, 50 result saves failing in one 3 s outage backed
        # off to 30 s each, long after the server was back.
        self.attempts: dict[object, int] = {}
        # Set when the outage ends: the operations waiting to try again go on.
        self.back = asyncio.Event()
        self.logged_at = 0.0
        self.given_up = False
        # The operation whose last failed attempt was an error of the server's
        # answer, not of reaching it: a PING the server answers ends that only
        # while this operation waits (it was sent and not refused: it works).
        # An idle fetch that works returns nothing, and a READONLY that had
        # passed (a failover) left the broker failing: /readyz 503 and its
        # clock running while idle, then one dropped connection exit 3.
        self.failing: object | None = None
        # Operations under way (a token each) and when each started; still
        # under way while they rest before trying again (`resting`), so that
        # the watch PINGs the server during a long backoff and ends the
        # outage as soon as it answers.
        self.pending: dict[object, float] = {}
        self.resting: set[object] = set()

    def failed(
        self,
        exc: BaseException,
        operation: object,
        started: float | None = None,
        next_in: float | None = None,
    ) -> float | None:
        """Log a failed attempt; the delay before the next, or None past the deadline.

        `operation`: what failed (its token), backing off on its own attempts;
        `started`: when the failed attempt began, if the clock starts now;
        `next_in`: when the next attempt comes, if not after a backoff.
        """
        now = time.monotonic()
        first = self.since is None
        if self.since is None:
            self.since = now if started is None else min(started, now)
            self.back = asyncio.Event()
            self.report(True)
        elif started is not None and started < self.since:
            # An attempt that began earlier failed later (a PING unanswered
            # for its deadline): recorded just after another failure, it was
            # not counted, and an outage ran past the deadline unnoticed.
            self.since = started
        waited = now - self.since
        if waited >= self.retry_timeout:
            return None
        attempt = self.attempts.get(operation, 0)
        self.attempts[operation] = attempt + 1
        # The last attempt lands on the deadline rather than past it.
        delay = min(
            _backoff(attempt) if next_in is None else next_in,
            self.retry_timeout - waited,
        )
        self.failing = None if is_connection_error(exc) else operation
        if first and self.failing is not None:
            # Not an outage of the server's: where it came from may be news.
            logger.debug("%s failed:", self.name, exc_info=exc)
        if now - self.logged_at >= LOG_EVERY_SECONDS:
            self.logged_at = now
            logger.warning(
                "%s %s (%s); retrying in %.1f s.",
                self.name,
                _state(exc),
                describe(exc),
                delay,
            )
        return delay

    def gave_up(self, exc: BaseException) -> str:
        """The `Error:` line's message: what was unreachable, and for how long."""
        if refuses_credentials(exc):
            return f"{self.name} refused the credentials: {describe(exc)}"
        waited = time.monotonic() - (self.since or time.monotonic())
        return (
            f"{self.name} {_state(exc)} for {waited:.1f} s "
            f"(--broker-retry-timeout {self.retry_timeout:g}): {describe(exc)}"
        )

    def recovered(self) -> None:
        if self.since is not None:
            logger.warning(
                "%s is back after %.1f s.", self.name, time.monotonic() - self.since
            )
            self.since = None
            self.attempts.clear()
            self.failing = None
            self.back.set()
            self.report(False)

    def answered(self, waiting: Collection[object] = ()) -> None:
        """Its server answered a PING while `waiting` operations were under way.

        That ends an outage; a failing operation's failure, only if it is
        among them: it was sent again, and it waits instead of failing.
        """
        if self.failing is None or self.failing in waiting:
            self.recovered()

    def probe_every(self) -> float:
        return max(PROBE_FLOOR_SECONDS, min(PROBE_SECONDS, self.retry_timeout / 4))

    def deadline(self) -> float | None:
        return None if self.since is None else self.since + self.retry_timeout

    def can_ping(self) -> bool:
        return pinger(self.owner) is not None  # a client may be made at startup

    async def unanswered(self) -> Exception | None:
        """Why the server did not answer a PING in time; None if it did.

        A server we cannot ask counts as answering (taskiq's behaviour).
        """
        ping = pinger(self.owner)
        if ping is None:
            return None
        try:
            await asyncio.wait_for(ping(), self.ping_timeout)
        except asyncio.TimeoutError:
            return ConnectionError(
                f"no answer to a PING within {self.ping_timeout:g} s"
            )
        except Exception as exc:
            if is_connection_error(exc):
                return exc
            # An error answer is an answer.
        return None


class BrokerOutages:
    """Installed on the broker of every worker process by the runner."""

    def __init__(
        self,
        broker: AsyncBroker,
        path: str,
        retry_timeout: float,
        give_up: Callable[[str], None],
    ) -> None:
        self.path = path
        self.retry_timeout = retry_timeout
        self.give_up = give_up
        self.stopping = asyncio.Event()
        self.connecting_since: float | None = None
        # Told whenever the broker becomes unreachable (True) and back (False).
        self.on_broker_outage: Callable[[bool], None] = lambda unreachable: None
        self.broker = Dependency(
            f"Broker {path!r}", broker, retry_timeout, self._broker_outage
        )
        self.backend = Dependency(
            f"Result backend of broker {path!r}",
            broker.result_backend,
            retry_timeout,
            lambda unreachable: None,
        )
        self.watching: asyncio.Task[None] | None = None
        # Operations waiting on a dependency given up on, being cancelled.
        self.cutting: set[asyncio.Future[None]] = set()
        self.results_lost = False
        # taskiq logs a result it could not save with a traceback.
        logging.getLogger("taskiq.receiver.receiver").addFilter(_unsaved_in_one_line)
        logging.getLogger("nats.aio.client").addFilter(one_line)
        self.started = False
        self.lost = LostState(broker, repr(path))
        renew_closed_connections(broker)
        fetch_without_client_timeout(broker, retry_timeout)
        self._wrap_startup(broker)
        self._wrap_shutdown(broker)
        self._wrap_listen(broker)
        self._wrap_results(broker)

    def stop(self) -> None:
        """A signal arrived: stop waiting for the broker."""
        self.stopping.set()

    def _broker_outage(self, unreachable: bool) -> None:
        self.on_broker_outage(unreachable)

    def _wrap_startup(self, broker: AsyncBroker) -> None:
        startup = broker.startup
        # Registered after the app's lifespan handler: from then on, what is
        # left of the startup is the broker connecting.
        broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, self._connecting)

        async def startup_until_reachable() -> None:
            while True:
                try:
                    await self._bounded(startup())
                    await self.lost.remember()
                except (TaskiqFastAPIError, WorkerStopped):
                    raise
                except Exception as exc:
                    if not is_connection_error(exc):
                        raise BrokerStartupError(
                            f"Broker {self.path!r} failed to start: {describe(exc)}",
                        ) from exc
                    delay = self.broker.failed(
                        exc, "startup", started=self.connecting_since
                    )
                    if delay is None:
                        raise BrokerStartupError(self.broker.gave_up(exc)) from exc
                    if await _wait_for(self.stopping.wait(), delay):
                        raise WorkerStopped from exc
                    continue
                self.broker.recovered()
                self.started = True
                self.watching = asyncio.create_task(self._watch())
                return

        broker.startup = startup_until_reachable  # type: ignore[method-assign]

    def _wrap_shutdown(self, broker: AsyncBroker) -> None:
        shutdown = broker.shutdown

        async def shutdown_even_if_never_connected() -> None:
            if self.watching is not None:
                self.watching.cancel()
            # Where the broker's own shutdown got to: its client's close comes
            # before the handlers (taskiq-nats), the result backend's after.
            handlers = broker.event_handlers[TaskiqEvents.WORKER_SHUTDOWN]
            reached: list[str] = []

            def first(_state: TaskiqState) -> None:
                reached.append("handlers")

            def last(_state: TaskiqState) -> None:
                reached.append("backend")

            handlers.insert(0, first)
            handlers.append(last)
            try:
                await shutdown()
            except Exception as exc:
                if reached == ["handlers"] or not self._unreachable(exc):
                    raise  # a handler's own error, or no outage's
                logger.debug(
                    "Broker %r, unreachable, failed to shut down (%s).",
                    self.path,
                    describe(exc),
                )
                if reached:
                    return  # its handlers ran: only its result backend is left
                try:
                    await AsyncBroker.shutdown(broker)  # handlers, then backend
                except Exception as backend_exc:  # a backend never started either
                    logger.debug("Its result backend too: %s", describe(backend_exc))
            finally:
                for marker in (first, last):
                    if marker in handlers:
                        handlers.remove(marker)

        broker.shutdown = shutdown_even_if_never_connected  # type: ignore[method-assign]

    def _unreachable(self, exc: Exception) -> bool:
        """Whether the broker's shutdown raised `exc` as its server is gone.

        Its result backend's server too: taskiq-nats' result backend closes
        a client of its own, which raised for a server gone while results
        waited (a stop during the outage), with a traceback.
        """
        return (
            not self.started
            or is_connection_error(exc)
            or any(
                dependency.since is not None or dependency.given_up
                for dependency in (self.broker, self.backend)
            )
        )

    def _connecting(self, _state: TaskiqState) -> None:
        self.connecting_since = time.monotonic()

    async def _bounded(self, startup: Awaitable[None]) -> None:
        """Run the broker's startup; past the deadline of connecting, fail.

        The app's lifespan is not bounded: only the time since it finished,
        and within the outage's clock once an attempt failed (a client that
        retries inside its connect, as nats-py does, is stopped at the
        deadline rather than given a whole retry timeout per attempt). A stop
        signal stops the connecting too: a Ctrl-C while nats-py retried was
        ignored until the deadline (2 minutes by default), and so was the
        supervisor's stop when another worker gave up.
        """
        self.connecting_since = None
        running = asyncio.ensure_future(startup)
        while True:
            done, _ = await asyncio.wait({running}, timeout=0.25)
            if done:
                return running.result()
            since = self.connecting_since
            if since is None:
                continue
            if self.stopping.is_set():
                await cancel_until_done(running)
                raise WorkerStopped
            deadline = self.broker.deadline() or since + self.retry_timeout
            if time.monotonic() >= deadline:
                await cancel_until_done(running)
                raise ConnectionError(
                    f"its startup was still connecting after "
                    f"{time.monotonic() - since:.1f} s"
                )

    def _wrap_listen(self, broker: AsyncBroker) -> None:
        listen: Callable[[], AsyncIterator[Any]] = broker.listen
        pending = self.broker.pending

        async def listen_until_reachable() -> AsyncGenerator[Any, None]:
            source: AsyncIterator[Any] | None = None
            fetch = object()  # this loop's token among the broker's operations
            reconnecting = False  # the server may have restarted since
            try:
                while True:
                    if source is None:
                        source = listen()
                    pending[fetch] = started = time.monotonic()
                    try:
                        if reconnecting or self.lost.unsure:
                            await self.lost.reconnected()
                            reconnecting = False
                        message = await anext(source)
                    except StopAsyncIteration:
                        return
                    except Exception as exc:
                        source = None  # it raised, so it is finished
                        if not is_connection_error(exc):
                            failure = await self._recover(exc, fetching=True)
                            if failure is None:
                                continue  # recreated: fetch again
                            exc = failure  # retried as an outage is, below
                        reconnecting = True
                        if await self._retry_fetch(exc, fetch, started):
                            return  # stopping: taskiq finishes in-flight tasks
                        continue
                    finally:
                        pending.pop(fetch, None)
                    if self.broker.since is not None:
                        self.broker.recovered()
                    if isinstance(message, AckableMessage):
                        message = self._retrying_ack(message)
                    yield message
            finally:
                if source is not None:
                    await _close_fetch(source)

        broker.listen = listen_until_reachable  # type: ignore[method-assign]

    def _wrap_results(self, broker: AsyncBroker) -> None:
        backend = broker.result_backend
        set_result = backend.set_result

        def set_result_until_saved(
            task_id: str, result: Any
        ) -> Coroutine[Any, Any, None]:
            # Not a coroutine of its own: one frame fewer per wait.
            return self._until_done(lambda: set_result(task_id, result), self.backend)

        backend.set_result = set_result_until_saved  # type: ignore[method-assign]

    def _retrying_ack(self, message: AckableMessage) -> AckableMessage:
        ack = message.ack

        async def ack_until_done() -> None:
            if self.results_lost:
                # taskiq acknowledges a message whose result it failed to
                # save (`when_saved`): left for the broker to deliver again.
                logger.debug("Not acknowledged: results can no longer be saved.")
                return
            # Past the broker's deadline: not acknowledged, the broker delivers
            # it again. Not raised either: taskiq's callback, which nobody
            # awaits, ended there, and with `when_executed` a result its
            # (reachable) backend could have saved was dropped, unsaid.
            if self.broker.given_up:
                logger.debug("Not acknowledged: the broker was given up on.")
                return
            try:
                # taskiq allows a synchronous ack: Callable[[], Awaitable | None].
                await self._until_done(lambda: maybe_awaitable(ack()), self.broker)
            except Exception as exc:
                if not self.broker.given_up:
                    raise
                logger.debug("Not acknowledged: %s", describe(exc))

        return with_ack(message, ack_until_done)

    async def _until_done(
        self, call: Callable[[], Awaitable[T]], dependency: Dependency
    ) -> T:
        """Retry `call` while `dependency` is unreachable.

        As soon as it is back (another operation got through, or a PING was
        answered), not after this one's backoff. A stop signal does not end
        the retries: a graceful stop finishes the tasks in flight, and a task
        whose result is not saved is not finished (it was dropped, and the
        command exited 0); a second signal cancels them, and the command
        exits 4. Past the deadline the command is stopped and the last error
        raised: taskiq reports it as it did before, and does not acknowledge
        a message whose result was not saved. Once `dependency` is given up
        on, `call` is not tried: a task finishing during the stop waited on a
        server that never answers, with no watch left to cut it (a client
        with no socket timeout waits for ever), and the stop waited for it.
        Refused credentials give up at once.
        """
        # The task itself: the watch cancels it if the server never answers.
        token: object = asyncio.current_task() or object()
        while True:
            if dependency.given_up:
                raise ConnectionError(f"not tried: {dependency.name} was given up on")
            dependency.pending[token] = time.monotonic()
            try:
                done = await call()
            except Exception as exc:
                if not is_connection_error(exc):
                    failure = await self._recover(exc)
                    if failure is None:
                        continue  # recreated: try again
                    if failure is exc and not _passes(exc):
                        if refuses_credentials(exc):
                            self._give_up(dependency, exc)
                        raise  # not an outage: as taskiq would
                    exc = failure
                delay = dependency.failed(exc, token)
                if delay is None:
                    self._give_up(dependency, exc)
                    raise
                await self._rest(dependency, token, delay)
                continue
            finally:
                dependency.pending.pop(token, None)
            if dependency.since is not None:
                dependency.recovered()
            return done

    async def _rest(
        self,
        dependency: Dependency,
        operation: object,
        delay: float,
        *also: Coroutine[Any, Any, Any],
    ) -> None:
        """Wait `delay` before `operation` tries again, or less.

        Until `dependency` is back, or one of `also` ends.
        """
        dependency.resting.add(operation)
        try:
            await _first(delay, dependency.back.wait(), *also)
        finally:
            dependency.resting.discard(operation)

    def _give_up(self, dependency: Dependency, exc: BaseException) -> None:
        """Past `dependency`'s deadline: the command stops, naming it.

        A result save or an ack still waiting on its server would keep its
        task in flight, and the stop waiting for it: it is cancelled (so not
        acknowledged) until it ends, as a client may swallow one
        cancellation (`cancel_until_done`); a save that did so kept the
        command from exiting until --wait-tasks-timeout. Cancelled in tasks
        of their own, as the watch goes on.
        """
        dependency.given_up = True
        self.results_lost |= dependency is self.backend
        self.give_up(dependency.gave_up(exc))
        this = asyncio.current_task()  # an operation giving up raises itself
        for token in list(dependency.pending):
            if isinstance(token, asyncio.Task) and token is not this:
                cutting = asyncio.ensure_future(cancel_until_done(token))
                self.cutting.add(cutting)
                cutting.add_done_callback(self.cutting.discard)

    async def _recover(
        self, exc: Exception, fetching: bool = False
    ) -> Exception | None:
        """Recreate what the server lost, if `exc` says it lost the broker's state.

        None once recreated (try again); the outage met while recreating, to
        retry as one; otherwise `exc` itself.
        """
        try:
            recreated = await self.lost.recover(exc, fetching)
        except Exception as recovering:
            if is_connection_error(recovering):
                return recovering
            logger.debug("Could not recreate the broker's state: %s", recovering)
            return exc
        return None if recreated else exc

    async def _retry_fetch(self, exc: Exception, fetch: object, started: float) -> bool:
        """Whether the worker is stopping; otherwise fetch again when this returns.

        A fetch that timed out after waiting is idle, unless its server does
        not answer a PING either. Once a stop signal came, no failure is an
        outage: the broker's own shutdown closes the connection of a fetch
        that taskiq left running (0.11) or cancelled without waiting (0.12).
        """
        if self.stopping.is_set():
            logger.debug(
                "Broker %r: fetch ended as the worker stops: %s",
                self.path,
                describe(exc),
            )
            return True
        if (
            "Timeout" in type(exc).__name__
            and time.monotonic() - started >= IDLE_WAIT_SECONDS
        ):
            pinged = time.monotonic()
            if await self.broker.unanswered() is None:
                logger.debug(
                    "Broker %r: idle fetch timed out; fetching again.", self.path
                )
                self.broker.answered((fetch,))  # it waited: it works
                return False
            # The PING failed; the fetch before it may have waited for hours.
            delay = self.broker.failed(exc, fetch, pinged)
        elif refuses_credentials(exc):
            delay = None  # no retry helps: said at once, as at startup
        else:
            # From now: a fetch may wait idle.
            delay = self.broker.failed(exc, fetch)
        if delay is None:
            self._give_up(self.broker, exc)  # every process stops gracefully
            await self.stopping.wait()
            return True
        await self._rest(self.broker, fetch, delay, self.stopping.wait())
        return self.stopping.is_set()

    async def _watch(self) -> None:
        """Ping a dependency whose operation waits long: is its server there?

        A fetch or a result save may wait for ever on a server that accepted
        the connection and never answers; a fetch may also wait because no
        message comes. A PING with a deadline tells them apart, and ends the
        outage it finds as soon as the server answers again.

        After one is given up on, the other is watched still: broker and
        results on one server that stopped answering, the broker was given
        up on first, and a result save then waited on it for ever (with no
        socket timeout), and the stop with it.
        """
        every = self.broker.probe_every()
        while True:
            await asyncio.sleep(every)
            for dependency in (self.broker, self.backend):
                now = time.monotonic()
                waiting = {
                    token: started
                    for token, started in dependency.pending.items()
                    if now - started >= every
                }
                if dependency.given_up or not waiting:
                    continue
                if not dependency.can_ping():
                    continue
                unanswered = await dependency.unanswered()
                if unanswered is None:
                    # Those still waiting on their attempt: one that failed
                    # meanwhile (resting before it tries again) did not work.
                    dependency.answered(
                        [
                            token
                            for token, started in waiting.items()
                            if dependency.pending.get(token) == started
                            and token not in dependency.resting
                        ]
                    )
                    continue
                if dependency.failed(unanswered, "watch", now, every) is None:
                    self._give_up(dependency, unanswered)


def _passes(exc: BaseException) -> bool:
    """Whether `exc` says the server cannot take writes for now: retried, failing.

    A Redis replica during a failover (READONLY), a cluster slot being
    migrated (TRYAGAIN). Left to taskiq, the results of every task that
    finished in a 3 s failover were lost, a traceback each (the message of
    a list queue already popped), and the command exited 0.
    """
    if any(
        name in cls.__name__
        for cls in type(exc).__mro__
        for name in ("ReadOnly", "TryAgain")
    ):
        return True
    return type(exc).__name__ == "ResponseError" and str(exc).startswith(
        ("READONLY ", "TRYAGAIN ")
    )


async def _close_fetch(source: AsyncIterator[Any]) -> None:
    """Close the broker's own fetch; what it raises as it closes is not news.

    taskiq-redis' stream broker releases a Redis lock as its fetch is closed,
    on a connection the broker's shutdown may have closed already: the
    error came out of a task nobody awaits, as a traceback.
    """
    try:
        await source.aclose()  # type: ignore[attr-defined]
    except Exception as exc:
        logger.debug("The broker's fetch raised as it was closed: %s", describe(exc))


def _unsaved_in_one_line(record: logging.LogRecord) -> bool:
    """A "Can't set result" record of taskiq's for an outage: its cause, one line.

    So too for refused credentials, which stop the command, and for a server
    that could take no writes until the deadline (`_passes`).
    """
    error = record.exc_info[1] if record.exc_info else None
    if (
        error is not None
        and (is_connection_error(error) or refuses_credentials(error) or _passes(error))
        and str(record.msg).startswith("Can't set result")
    ):
        return one_line(record)
    return True


def unrenewed_fetch(broker: AsyncBroker) -> str | None:
    """Why the broker could not ride out a server restart, when we can tell.

    taskiq-nats' pull-based JetStream broker fetches with no timeout by
    default; a NATS server that restarts forgets the pending fetch, and the
    worker waits for its answer for ever. Said before any worker starts.
    """
    if (
        type(broker).__name__ == "PullBasedJetStreamBroker"
        and getattr(broker, "pull_consume_timeout", 0) is None
    ):
        return (
            "PullBasedJetStreamBroker has no pull_consume_timeout: after a NATS "
            "server restart its workers would wait for ever on a fetch the "
            "server forgot. Pass pull_consume_timeout=5 (seconds)."
        )
    return None


async def _first(seconds: float, *waits: Coroutine[Any, Any, Any]) -> None:
    """Wait `seconds`, or less: until the first of `waits` ends."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def _wait_for(waiting: Awaitable[Any], seconds: float) -> bool:
    """Whether `waiting` finished within `seconds`."""
    try:
        await asyncio.wait_for(waiting, seconds)
    except asyncio.TimeoutError:
        return False
    return True
