"""The mPLUG model: pure torch modules with no training-system code inside."""
