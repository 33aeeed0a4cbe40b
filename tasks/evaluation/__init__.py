"""How every flow reports: generation and the before/after evaluation (``evaluate.py``), the judges
(phrases, classifier, trigrams, judge models), evaluation specs and lm-evaluation-harness. Imports
``core`` only."""
