"""The abliterate pipeline: collect residual activations (``collect.py``, cached by ``cache.py``),
difference-of-means candidates (``candidates.py``), their scores (``score.py``), the choice
(``select.py``), gradient refinement (``refine.py``) and the weight edit (``orthogonalize.py``), with the
flow's config (``config.py``) and the chosen direction's record (``found.py``). Imports ``core`` and
``evaluation``."""
