"""The wire format: tensor dicts to bytes and back. Pure and synchronous; no NATS, no asyncio."""
