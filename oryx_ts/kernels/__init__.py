"""Mixer ops: pure-torch references (CPU path) and fast paths, chosen in `dispatch`."""
