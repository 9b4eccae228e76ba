"""The API. Its lifespan opens the Redis client that routes and tasks share."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel
from redis.asyncio import Redis

import taskiq_fastapi
from signup.broker import broker
from signup.dependencies import UserRepository, get_users
from signup.settings import REDIS_URL
from signup.tasks import send_welcome_email


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    redis = Redis.from_url(REDIS_URL)
    await redis.ping()  # fail at startup, not at the first request
    app.state.outbox = []
    app.state.open_mailer_sessions = 0
    try:
        yield {"redis": redis}  # becomes request.state.redis, in routes and tasks
    finally:
        await redis.aclose()


# One line starts the broker with the app (and, in a worker, is left alone).
app = FastAPI(
    title="Sign-up", lifespan=taskiq_fastapi.broker_lifespan(broker, lifespan)
)


class SignUp(BaseModel):
    email: str
    name: str


@app.post("/signup")
async def sign_up(
    form: SignUp, users: UserRepository = Depends(get_users)
) -> dict[str, Any]:
    user = await users.add(form.email, form.name)
    task = await send_welcome_email.kiq(user.id)
    result = await task.wait_result(timeout=30)
    if result.is_err:
        raise HTTPException(502, f"sending the e-mail failed: {result.error}")
    return {"user_id": user.id, "email": result.return_value}


@app.get("/users/{user_id}", name="read_user")
async def read_user(
    user_id: str, users: UserRepository = Depends(get_users)
) -> dict[str, str]:
    user = await users.get(user_id)
    if user is None:
        raise HTTPException(404, f"no user {user_id}")
    return {"id": user.id, "email": user.email, "name": user.name}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
