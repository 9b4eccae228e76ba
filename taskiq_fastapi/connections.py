"""Which broker errors are outages, shared by the API process and the workers.

The worker command (`taskiq_fastapi_cli/outages.py`) retries these while a
broker is unreachable; the API process (`broker_lifespan`) retries them only
where nothing was sent. Both sides must agree on what an outage is, so the
rule lives here once.

Connection-type errors are `OSError` (socket errors, Python's
ConnectionError and TimeoutError) and errors whose class or a base class is
named like a connection, timeout or no-servers error, as redis-py, aio-pika
and nats-py name theirs. A Redis Cluster that cannot serve is one too:
redis-py's ClusterDownError (a node refusing commands until its cluster is
ok again, as for seconds after it restarts), and a cluster error raised from
a connection-type error (RedisClusterException "Redis Cluster cannot be
connected", when no node answers). Refused credentials are not, though
redis-py derives its AuthenticationError and AuthorizationError from its
ConnectionError: retrying cannot help, and the error is shown at once.

An event loop's refusal to use a closed connection is an outage too: see
`_refused_by_loop`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
from typing import Any

_CONNECTION_NAMES = ("Connection", "Timeout", "NoServers", "ClusterDown")
# Refused credentials: redis-py makes them ConnectionErrors, but no retry helps.
_CREDENTIAL_NAMES = ("Authentication", "Authorization")


def is_connection_error(exc: BaseException) -> bool:
    """Whether `exc` says the broker cannot be reached (worth a retry)."""
    if refuses_credentials(exc):
        return False
    if isinstance(exc, OSError) or _named(exc, _CONNECTION_NAMES):
        return True
    if _refused_by_loop(exc) is not None:
        return True
    cause = exc.__cause__
    return (
        "Cluster" in type(exc).__name__
        and cause is not None
        and is_connection_error(cause)
    )


def refuses_credentials(exc: BaseException) -> bool:
    """Whether `exc` says the server refused the credentials (no retry helps)."""
    return _named(exc, _CREDENTIAL_NAMES)


def _named(exc: BaseException, fragments: tuple[str, ...]) -> bool:
    """Whether the class of `exc`, or a base class, is named with a fragment."""
    return any(
        fragment in cls.__name__ for cls in type(exc).__mro__ for fragment in fragments
    )


# CPython gh-136234 (3.12 and 3.13 as installed here): the selector
# transport's writelines, called once the transport is closed, calls the
# write callback its close() set to None and raises TypeError (or, on some
# versions, AttributeError), where write() drops the data. nats-py's close
# writes what it still holds with writelines: a server gone when the API
# stops raised this TypeError out of broker_lifespan, and Python 3.11 raises
# ConnectionResetError from the same close.
_SELECTOR_EVENTS = os.path.join("asyncio", "selector_events.py")
# uvloop, the loop of uvicorn and of taskiq's worker wherever it is
# installed (FastAPI's "standard" extra installs it): any use of a closed
# transport, write() too, raises RuntimeError from this Cython file. The
# same close raised it out of broker_lifespan. Only a socket's transport (a
# TCP or Unix socket connection, named in the message) is a connection:
# uvloop says the same of any closed handle, a subprocess pipe an app's
# own code closed among them.
_UVLOOP_HANDLE = "uvloop/handles/handle.pyx"
_UVLOOP_SOCKET = re.compile(r"^unable to perform operation on <(TCP|Unix)Transport ")


def _refused_by_loop(exc: BaseException) -> str | None:
    """What the event loop could not do on a closed connection, where `exc` says so.

    asyncio's: raised in that writelines, on a closed transport, by what
    close() set to None. The same writelines given data that is not bytes
    raises TypeError too (memoryview's), a bug in its caller: it was retried
    as an outage and described as a lost connection.
    """
    frames = exc.__traceback__
    if frames is None:
        return None
    while frames.tb_next is not None:
        frames = frames.tb_next
    frame = frames.tb_frame
    if isinstance(exc, RuntimeError):
        message = str(exc)
        closed = frame.f_code.co_filename.endswith(_UVLOOP_HANDLE)
        closed = closed and message.endswith("the handler is closed")
        if closed and _UVLOOP_SOCKET.match(message) is not None:
            return "uvloop could not use the closed connection"
        return None
    if not isinstance(exc, (TypeError, AttributeError)):
        return None
    code = frame.f_code
    if code.co_name != "writelines" or not code.co_filename.endswith(_SELECTOR_EVENTS):
        return None
    transport = frame.f_locals.get("self")
    closed = isinstance(transport, asyncio.WriteTransport) and transport.is_closing()
    if closed and str(exc).startswith("'NoneType' object"):
        return "asyncio could not write to the closed connection"
    return None


def describe(exc: BaseException) -> str:
    """`ClassName: message`, or the class name for an error without a message."""
    refused = _refused_by_loop(exc)
    if refused is not None:
        return f"Connection lost ({refused})"
    message = _REDIS_CLIENT.sub(_address, str(exc))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


# redis-py writes the repr of a client into some messages: its Sentinel's
# MasterNotFoundError names each sentinel it asked that way, followed by
# " - " and that sentinel's error. Each repr lists every option of the
# connection (a kilobyte with redis-py 8; a CA given as text spans lines),
# the password too before redis-py 8: in a log line, each becomes its
# host:port.
_REDIS_CLIENT = re.compile(
    r"<redis\.asyncio\.client\.Redis\((.*?)\)>\)>\)>(?= - |, |$)", re.DOTALL
)
_HOST = re.compile(r"[(,]host=([^,]*),port=(\d+)")


def _address(client: re.Match[str]) -> str:
    where = _HOST.search(client[1])
    return f"{where[1]}:{where[2]}" if where else "a Redis client"


# A task cancelled at a deadline that still runs after this is cancelled
# again (its client swallowed the cancellation).
RECANCEL_SECONDS = 0.25


async def cancel_until_done(task: asyncio.Future[Any]) -> None:
    """Cancel `task` and wait until it ends, cancelling it again as long as it runs.

    One cancellation may be swallowed: before Python 3.12, `asyncio.wait_for`
    answers a cancellation that lands just after the future it waits on
    finished with that future's result or error. nats-py waits for each
    connection attempt so, and a cancellation landing as an attempt was
    refused became one more refusal: it tried again, 2 s apart for 2 minutes
    at its defaults, and the command exited that long past its deadline (on
    a loaded machine, where the deadline's check can fall in the turn of the
    event loop that handles a refusal). What the task raises as it ends is
    not news. Used by the workers (a startup, result save or ack at its
    deadline) and the API (a NATS connect at its bound).
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=RECANCEL_SECONDS)
    if not task.cancelled():
        task.exception()  # retrieved, or asyncio logs it as never retrieved


def backoff(attempt: int, first: float, cap: float) -> float:
    """Exponential, capped, with jitter so that processes do not retry in step."""
    delay: float = min(cap, first * 2**attempt)
    return delay * random.uniform(0.5, 1.0)


def one_line(record: logging.LogRecord) -> bool:
    """A log filter: a client's logged error with its cause, not a traceback.

    nats-py logs each failed (re)connection attempt with a full traceback.
    """
    if record.exc_info and record.exc_info[1] is not None:
        record.msg = f"{record.getMessage()}: {describe(record.exc_info[1])}"
        record.args = None
        record.exc_info = None
        record.exc_text = None
    return True
