"""The taskiq broker, shared by the API (to send tasks) and the workers."""

from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

from signup.settings import REDIS_URL

# socket_timeout=None: the worker's BRPOP waits for messages as long as it
# takes; with redis-py 8's default of 5 s an idle worker would fail and be
# restarted every 5 s (taskiq-redis does not catch that timeout).
broker = ListQueueBroker(
    REDIS_URL, queue_name="signup", socket_timeout=None
).with_result_backend(RedisAsyncResultBackend(REDIS_URL, result_ex_time=600))
