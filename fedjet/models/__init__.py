"""Local Hugging Face checkpoints: loading, identity, LoRA adapters, text generation."""
