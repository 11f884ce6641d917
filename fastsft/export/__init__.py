"""Exporting a trained model: exact QLoRA merge, drift report, GGUF."""
