"""The named model presets and the check of ``--model``: torch-free, so a bad flag fails
before anything heavy is imported or any process starts."""

from __future__ import annotations

from pathlib import Path

from fedjet.config.job import JobConfig
from fedjet.errors import ConfigError

PRESETS: dict[str, dict[str, int]] = {
    # ~1.3 M parameters with the byte vocabulary: trains at a useful speed on 2 CPU cores.
    "tiny": {"n_embd": 160, "n_layer": 4, "n_head": 4, "n_positions": 128},
    # ~5 M parameters.
    "small": {"n_embd": 256, "n_layer": 6, "n_head": 8, "n_positions": 256},
    # ~12 M parameters; its dense update is larger than 8 MB (tests chunking).
    "medium": {"n_embd": 384, "n_layer": 6, "n_head": 6, "n_positions": 256},
    # ~85 M parameters (GPT-2 small's body): the GPU check of `fedjet bench gpu`.
    "base": {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024},
}


def validate_model_source(job: JobConfig) -> None:
    """Refuse a bad ``--model`` before any process starts (``--peft`` was parsed with the config)."""
    if job.model not in PRESETS and not (Path(job.model) / "config.json").is_file():
        raise ConfigError(
            f"--model {job.model}: neither a preset {sorted(PRESETS)} nor a local checkpoint directory with config.json"
        )
