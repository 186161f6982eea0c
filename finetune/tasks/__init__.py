"""The downstream tasks: each a `TaskModel` around an MPLUG, its loss and its evaluation."""
