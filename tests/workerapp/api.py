"""The API the restart tests serve with a real uvicorn: routes that kick tasks.

Its broker starts with `broker_lifespan`, as the README's apps do.
"""

from fastapi import FastAPI

import taskiq_fastapi
from workerapp.broker import broker
from workerapp.tasks import mark

app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker))


@app.get("/kick/{n}")
async def kick(n: int) -> int:
    await mark.kiq(n)
    return n


@app.get("/wait/{n}")
async def wait(n: int) -> int:
    task = await mark.kiq(n)
    result = await task.wait_result(timeout=30)
    return int(result.return_value)
