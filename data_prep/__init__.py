"""Data preparation: synthetic data, tokenizers and batching of model inputs."""
