"""Worker daemon: model, data shard, local training, error feedback, publishing updates."""
