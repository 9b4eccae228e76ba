"""An app whose CarryRequestContext names its headers as one string."""

from fastapi import FastAPI

import taskiq_fastapi
from workerapp.broker import broker

app = FastAPI()
app.add_middleware(
    taskiq_fastapi.CarryRequestContext, broker=broker, headers="x-request-id"
)
