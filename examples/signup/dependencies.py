"""Ordinary FastAPI dependencies, shared as they are by the routes and the tasks."""

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from fastapi import Request
from redis.asyncio import Redis


@dataclass
class User:
    id: str
    email: str
    name: str


class UserRepository:
    """Users stored in Redis hashes; the client comes from the lifespan state."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def add(self, email: str, name: str) -> User:
        user_id = str(await self.redis.incr("signup:user-ids"))
        await self.redis.hset(
            f"signup:user:{user_id}", mapping={"email": email, "name": name}
        )
        return User(user_id, email, name)

    async def get(self, user_id: str) -> User | None:
        data = await self.redis.hgetall(f"signup:user:{user_id}")
        if not data:
            return None
        return User(user_id, data[b"email"].decode(), data[b"name"].decode())


def get_users(request: Request) -> UserRepository:
    return UserRepository(request.state.redis)


@dataclass
class Mailer:
    """Stands in for an SMTP connection: it records messages in an outbox."""

    session: int
    outbox: list[dict[str, str]]

    def send(self, to: str, subject: str, body: str) -> dict[str, str]:
        message = {"to": to, "subject": subject, "body": body}
        self.outbox.append(message)
        return message


_sessions = itertools.count(1)


def mailer_session(request: Request) -> Iterator[Mailer]:
    """A generator dependency: the session is closed after the task, always."""
    app_state = request.app.state
    mailer = Mailer(next(_sessions), app_state.outbox)
    app_state.open_mailer_sessions += 1
    try:
        yield mailer
    finally:
        app_state.open_mailer_sessions -= 1
