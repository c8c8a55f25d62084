"""Text data: WikiText loading, byte-level tokenization, partitioning across clouds."""
