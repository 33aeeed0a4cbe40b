"""compalign flows: one Hydra entry point per workflow (python -m flows.<name>), each a main of numbered
steps that calls tasks through the runtime and returns a typed result. Modules starting with ``_`` are
the flows' shared steps: ``_steps`` (abliterate and sweep), ``_finetune_data``, ``_tracking`` (every
MLflow call), ``_multirun`` (Hydra -m tracking), ``_common`` (the entry point's error handling)."""
