"""A NATS JetStream broker as taskiq-nats' defaults make it (nothing connects on import)."""

from taskiq_nats import PullBasedJetStreamBroker

broker = PullBasedJetStreamBroker("nats://127.0.0.1:1")
