"""Use a FastAPI app's dependencies and lifespan in taskiq tasks."""

from taskiq_fastapi.broker_lifespan import broker_lifespan
from taskiq_fastapi.exceptions import (
    AppConflictError,
    AppLoadError,
    AppStartupError,
    BrokerUnreachableError,
    DependencyError,
    LoadError,
    RequestContextError,
    RequestContextTooLargeError,
    TaskCancelledError,
    TaskiqFastAPIError,
    TaskNotCancellableError,
    TaskNotFoundError,
    TaskStatusError,
    TracingUnavailableError,
)
from taskiq_fastapi.integration import init, populate_dependency_context
from taskiq_fastapi.request import BASE_URL_ENV, DEFAULT_BASE_URL
from taskiq_fastapi.request_context import CarryRequestContext
from taskiq_fastapi.task_status import (
    Progress,
    TaskAccepted,
    TaskError,
    TaskRecord,
    TaskStatus,
    TaskStatusBase,
)
from taskiq_fastapi.tracing import trace_tasks

__all__ = [
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "AppConflictError",
    "AppLoadError",
    "AppStartupError",
    "BrokerUnreachableError",
    "CarryRequestContext",
    "DependencyError",
    "LoadError",
    "Progress",
    "RequestContextError",
    "RequestContextTooLargeError",
    "TaskAccepted",
    "TaskCancelledError",
    "TaskError",
    "TaskNotCancellableError",
    "TaskNotFoundError",
    "TaskRecord",
    "TaskStatus",
    "TaskStatusBase",
    "TaskStatusError",
    "TaskiqFastAPIError",
    "TracingUnavailableError",
    "broker_lifespan",
    "init",
    "populate_dependency_context",
    "trace_tasks",
]
