"""Errors raised by the integration; each names the app it is about and the cause."""


class TaskiqFastAPIError(Exception):
    """Base class, so callers such as the CLI can catch every integration error."""


class LoadError(TaskiqFastAPIError):
    """An import string cannot be imported, or does not name what it should."""


class AppLoadError(LoadError):
    """The app path cannot be imported, or it does not give a FastAPI app."""


class AppStartupError(TaskiqFastAPIError):
    """The app's lifespan failed during worker startup."""


class AppConflictError(TaskiqFastAPIError):
    """`init` was called again for the same broker with a different app."""


class DependencyError(TaskiqFastAPIError):
    """A task's dependencies cannot work outside an HTTP request.

    Found at worker startup, before any task runs.
    """


class RequestContextTooLargeError(TaskiqFastAPIError):
    """The request context a task would carry exceeds `max_bytes`; raised by kiq."""


class RequestContextError(TaskiqFastAPIError):
    """A task's Query/Header/Cookie/Path dependency rejected the carried request.

    Fails that task, as the same values would make a route answer 422.
    """


class BrokerUnreachableError(TaskiqFastAPIError):
    """The API process could not reach its broker within `broker_retry_timeout`.

    Raised only where nothing was sent; taskiq reports it as the cause of its
    SendTaskError or ResultIsReadyError.
    """


class TaskStatusError(TaskiqFastAPIError):
    """`TaskStatus` cannot serve the broker or tasks it was given."""


class TaskNotFoundError(TaskiqFastAPIError, LookupError):
    """`TaskStatus.cancel`: no such task, or one this TaskStatus does not show."""


class TaskNotCancellableError(TaskiqFastAPIError):
    """`TaskStatus.cancel`: the task has finished, or runs where it cannot be stopped.

    `state` is its state as recorded; the routes answer 409 with the message.
    Both are its args: taskiq makes a task's error again from them (in the
    result a task that lets it out saves) and pickle as well.
    """

    def __init__(self, message: str, state: str) -> None:
        super().__init__(message, state)
        self.state = state

    def __str__(self) -> str:
        return str(self.args[0])


class TaskCancelledError(TaskiqFastAPIError):
    """What the result of a task cancelled on request holds.

    An Exception, not a CancelledError: `raise_for_error()` in a route's
    `except Exception` is handled there, and an asyncio task that awaits the
    result is not taken for cancelled itself. While the task runs, its
    generator dependencies see the CancelledError that stopped it. Only a
    cancel request makes it, never a worker's own stop.
    """


class TracingUnavailableError(TaskiqFastAPIError):
    """`trace_tasks` was asked for, but taskiq or OpenTelemetry cannot do it."""
