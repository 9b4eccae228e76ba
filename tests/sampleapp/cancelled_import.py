"""A module whose import ends in a BaseException that is not a stop request.

asyncio.CancelledError is one: here a setup step run at import with
asyncio.run is cancelled, as a timeout around it would.
"""

import asyncio


async def _load_settings() -> None:
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    await asyncio.sleep(0)


asyncio.run(_load_settings())
