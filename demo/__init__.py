"""The built-in demo: a small preference world and the whole pipeline on it."""
