from taskiq import InMemoryBroker

broker = InMemoryBroker()
not_a_broker = "just a string"


def broker_factory() -> InMemoryBroker:
    return InMemoryBroker()
