"""NATS: the embedded server, subjects and streams, chunked blobs, ordered reads."""
