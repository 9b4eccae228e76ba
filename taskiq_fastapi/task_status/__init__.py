"""Tasks from the API: states, progress and typed results of kicked tasks."""

from taskiq_fastapi.task_status.records import Progress, TaskError, TaskRecord
from taskiq_fastapi.task_status.router import TaskAccepted, TaskStatus, TaskStatusBase

__all__ = [
    "Progress",
    "TaskAccepted",
    "TaskError",
    "TaskRecord",
    "TaskStatus",
    "TaskStatusBase",
]
