"""Downstream tasks: fine-tuning and evaluation."""
