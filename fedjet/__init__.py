"""fedjet: cross-cloud federated training of language models over NATS JetStream."""

__version__ = "0.1.0"
