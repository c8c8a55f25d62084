"""Moved to :mod:`fedjet.channel.recorded`; kept while the last importers move."""

from fedjet.channel.recorded import coordinator_view, keys_dir_for, only_job, recorded_jetstream

__all__ = ["coordinator_view", "keys_dir_for", "only_job", "recorded_jetstream"]
