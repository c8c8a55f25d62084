"""Write a trained global version out as a standard Hugging Face checkpoint."""
