"""The taskiq broker, shared by the API (to send tasks) and the workers."""

from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

from signup.settings import REDIS_URL

broker = ListQueueBroker(REDIS_URL, queue_name="signup").with_result_backend(
    RedisAsyncResultBackend(REDIS_URL, result_ex_time=600)
)
