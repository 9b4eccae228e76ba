import os

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
# The broker the API sends tasks through and the workers take them from:
# "redis" (a list on REDIS_URL) or "nats" (a JetStream stream on NATS_URL).
BROKER = os.environ.get("SIGNUP_BROKER", "redis")
NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
