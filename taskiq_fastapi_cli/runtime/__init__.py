"""The worker runtime: taskiq's supervisor and worker processes.

And the layers around the broker in each worker process (runner.py composes
them).
"""
