"""A list broker's fetch that no client timeout cuts off after the server popped.

Upstream behaviour worked around here: taskiq-redis' `ListQueueBroker` waits
for a message with a BRPOP that never ends on the server (no timeout), read
under the connection's socket timeout (redis-py 8: 5 s by default). When the
server stopped answering for longer than that (a frozen or overloaded
server, `SIGSTOP`, a VM paused), the read timed out and redis-py closed the
connection; the BRPOP was still in the server's input, and once it answered
again it popped a message and wrote it to the closed connection: one task
lost per worker process and per such stall, with no log line (2 of 4000 at
each 7 s freeze of the suite's runs, with two processes). The same race lost
a message kicked as an idle BRPOP timed out.

Here, in worker processes, each BRPOP has a server-side timeout
(`BLOCK_SECONDS`: the server answers nil then, so an idle fetch ends without
an error) and its reply is awaited without the socket timeout, for as long
as the worker would keep retrying the server: a server that does not answer
is found out by the outage watch's PINGs (outages.py), and a fetch that
waits on it receives its message once the server answers again. A reply
still missing well after that (`BLOCK_SECONDS` + `--broker-retry-timeout` +
`SLACK_SECONDS`, while the server answered PINGs: the connection itself is
dead, say a NAT that dropped it) ends the fetch with a `TimeoutError`, as
the socket timeout did, and the next fetch uses a new connection.

Per fetch: one BRPOP on a pooled connection, as taskiq-redis sends it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from taskiq import AsyncBroker

# The server answers an idle BRPOP with nil after this.
BLOCK_SECONDS = 5
# Past the server-side timeout and the retry timeout, before a fetch with no
# reply is taken for a dead connection.
SLACK_SECONDS = 5.0


def fetch_without_client_timeout(broker: AsyncBroker, retry_timeout: float) -> None:
    """Replace taskiq-redis' `ListQueueBroker.listen`.

    Exactly that class's: not a subclass's, nor a fetch the project wrapped.
    """
    try:
        from taskiq_redis import ListQueueBroker
    except ImportError:  # pragma: no cover - taskiq-redis is optional
        return
    own = getattr(broker.listen, "__func__", None) is ListQueueBroker.listen
    if type(broker) is not ListQueueBroker or not own:
        return
    wait = BLOCK_SECONDS + retry_timeout + SLACK_SECONDS

    async def listen() -> AsyncGenerator[bytes, None]:
        while True:
            reply = await _brpop(broker, wait)
            if reply is not None:
                yield reply[1]

    broker.listen = listen  # type: ignore[method-assign]


async def _brpop(broker: Any, wait: float) -> Any:
    """One BRPOP of the broker's queue; its reply awaited up to `wait` seconds."""
    pool = broker.connection_pool
    connection = await pool.get_connection()
    try:
        # The read below replaces the socket timeout with `wait`; the write
        # keeps it (nothing was sent if it times out).
        await connection.send_command("BRPOP", broker.queue_name, BLOCK_SECONDS)
        socket_timeout = connection.socket_timeout
        connection.socket_timeout = wait
        try:
            return await connection.read_response()
        finally:
            connection.socket_timeout = socket_timeout
    finally:
        await pool.release(connection)
