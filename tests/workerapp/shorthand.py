"""FastAPI's class shorthand, `Annotated[Pager, Depends()]`, in a task."""

from typing import Annotated

from fastapi import Depends

from workerapp.broker import broker


class Pager:
    def __init__(self, page: int = 1) -> None:
        self.page = page


@broker.task
async def listing(pager: Annotated[Pager, Depends()]) -> int:
    return pager.page
