"""A task whose dependency reads an HTTP header: no worker may start with it."""

from fastapi import Depends, Header

from workerapp.broker import broker


def current_user(authorization: str = Header()) -> str:
    return authorization


@broker.task
async def audit(event: str, user: str = Depends(current_user)) -> str:
    return f"{user}: {event}"
