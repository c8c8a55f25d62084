"""The asyncio coordinator: consume, decode, validate, aggregate, publish global versions."""
