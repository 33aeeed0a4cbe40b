"""compalign flows: one Hydra entry point per workflow (python -m flows.<name>)."""
