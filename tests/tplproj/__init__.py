"""A project in the shape a popular FastAPI template generates, written for
taskiq-fastapi 0.5: `tkq.py` names the app by a factory path, pytest swaps
in an InMemoryBroker, tasks take `Request = TaskiqDepends()`."""
