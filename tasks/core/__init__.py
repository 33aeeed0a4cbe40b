"""What every pipeline stands on: the config base (``config.py``: ``RunConfig``, ``Resources``;
``concept_config.py``: a concept run's sections), errors, logs, progress, storage, model loading and the
residual writers, forward passes and hooks, the engine of edited forward passes on contrastive prompts
(``contrast.py``: batches, behaviour log-odds, the one KL), prompts, checkpoints, plots, bootstrap
intervals, and the state a model-holding worker keeps (``worker.py``). Imports no other room."""
