"""A route-style dependency chain, written for FastAPI and unmodified for tasks."""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from workerapp.app import record


@dataclass
class Settings:
    name: str


def get_settings() -> Settings:
    return Settings(name="from-env")


def get_engine(request: Request, settings: Settings = Depends(get_settings)) -> str:
    return f"engine({settings.name}, {request.state.db})"


async def get_session(engine: str = Depends(get_engine)) -> AsyncIterator[str]:
    record("session opened")
    try:
        yield f"session({engine})"
    finally:
        record("session closed")


Session = Annotated[str, Depends(get_session)]
