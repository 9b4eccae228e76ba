"""Tasks written the way FastAPI code is: postponed annotations, `Annotated`
aliases, dependencies declared before the task's own arguments."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from taskiq import AsyncBroker


def get_db(request: Request) -> Iterator[str]:
    yield str(request.state.db)


DbDep = Annotated[str, Depends(get_db)]


def register(broker: AsyncBroker) -> Any:
    @broker.task
    async def send(db: DbDep, user_id: int, note: str = "-") -> list[object]:
        return [db, user_id, note]

    return send
