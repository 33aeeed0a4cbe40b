"""The sweep pipeline: its config (``config.py``), a trial and the edit it applies (``trial.py``), the
per-layer kernels (``kernels.py``), trial scoring on the validation prompts (``trials.py``), the search
(``search.py``: grid, TPE, the runners), the Pareto front and the pick (``front.py``) and confirmation
with generation (``confirm.py``). Imports ``core``, ``directions`` and ``evaluation``."""
