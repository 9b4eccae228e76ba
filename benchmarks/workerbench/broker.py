import os

from benchmarks.workerbench.brokers import make_broker

broker = make_broker(os.environ["BENCH_REDIS_URL"], os.environ["BENCH_QUEUE"])
