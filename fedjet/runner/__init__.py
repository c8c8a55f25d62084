"""``fedjet up``: the embedded default, one process per part, and the report it writes."""
