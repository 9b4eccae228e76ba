import os

from fastapi import Request
from taskiq import TaskiqDepends

from tplproj.tkq import broker


@broker.task
async def greet(name: str, request: Request = TaskiqDepends()) -> dict[str, object]:
    return {
        "text": f"{request.app.state.greeting}, {name}",
        "link": str(request.url_for("health")),
        "pid": os.getpid(),
    }
