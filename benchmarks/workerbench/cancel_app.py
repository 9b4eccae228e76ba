"""The TaskStatus benchmark app with cancellation on: nothing is ever cancelled."""

from fastapi import FastAPI

from benchmarks.workerbench.app import lifespan
from benchmarks.workerbench.broker import broker
from benchmarks.workerbench.tasks import with_request
from taskiq_fastapi import TaskStatus

status = TaskStatus(broker, [with_request], cancellable=True)
app = FastAPI(lifespan=lifespan)
app.include_router(status.router())
