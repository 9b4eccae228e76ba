from taskiq import InMemoryBroker

broker = InMemoryBroker()
not_a_broker = "just a string"


def broker_factory() -> InMemoryBroker:
    return InMemoryBroker()


def raising_broker_factory() -> InMemoryBroker:
    raise RuntimeError("BROKER_URL is not set")
