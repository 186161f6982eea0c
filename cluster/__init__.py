"""Where jobs run, and the `mplug` command."""
