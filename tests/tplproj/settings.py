import os

environment = os.environ.get("TPLPROJ_ENVIRONMENT", "dev")
redis_url = os.environ.get("REDIS_URL", "redis://localhost:6379")
queue = os.environ.get("TASKIQ_TEST_QUEUE", "tplproj")
