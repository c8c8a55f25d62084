"""Moved to :mod:`fedjet.models.build`; kept while the last importers move."""

from fedjet.models.build import (
    PRESETS,
    config_dict,
    initial_model,
    load_parameters,
    model_from_config,
    parameter_tensors,
    pick_device,
    preset_config,
    quiet_transformers,
    seeded,
)

__all__ = [
    "PRESETS",
    "config_dict",
    "initial_model",
    "load_parameters",
    "model_from_config",
    "parameter_tensors",
    "pick_device",
    "preset_config",
    "quiet_transformers",
    "seeded",
]
