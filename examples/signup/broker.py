"""The taskiq broker, shared by the API (to send tasks) and the workers."""

from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

from signup.settings import REDIS_URL

# taskiq-redis's defaults, as projects write it: `taskiq-fastapi worker`
# treats the idle BRPOP's 5 s socket timeout as the idle wait it is.
broker = ListQueueBroker(REDIS_URL, queue_name="signup").with_result_backend(
    RedisAsyncResultBackend(REDIS_URL, result_ex_time=600)
)
