"""The taskiq broker, shared by the API (to send tasks) and the workers.

Chosen by the environment (SIGNUP_BROKER), so one code base runs on either:
the API and the workers read the same variable, and tests can set it too.
"""

from taskiq import AsyncBroker

from signup.settings import BROKER, NATS_URL, REDIS_URL


def _redis() -> AsyncBroker:
    from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

    # taskiq-redis's defaults, as projects write it: `taskiq-fastapi worker`
    # treats the idle BRPOP's 5 s socket timeout as the idle wait it is.
    return ListQueueBroker(REDIS_URL, queue_name="signup").with_result_backend(
        RedisAsyncResultBackend(REDIS_URL, result_ex_time=600)
    )


def _nats() -> AsyncBroker:
    from taskiq_nats import NATSObjectStoreResultBackend, PullBasedJetStreamBroker

    # A durable pull consumer shared by every worker process: each message
    # goes to one of them; results live in a JetStream object store. With a
    # fetch timeout, a fetch the server forgot in a restart is renewed.
    return PullBasedJetStreamBroker(
        NATS_URL,
        subject="signup",
        stream_name="signup",
        durable="signup-workers",
        pull_consume_timeout=5,
    ).with_result_backend(
        NATSObjectStoreResultBackend(NATS_URL, bucket_name="signup-results")
    )


_BROKERS = {"redis": _redis, "nats": _nats}
if BROKER not in _BROKERS:
    raise ValueError(f"SIGNUP_BROKER={BROKER!r}: expected 'redis' or 'nats'.")
broker = _BROKERS[BROKER]()
