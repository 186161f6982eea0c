"""Pretraining: the mPLUG model, its objectives and its configuration."""
