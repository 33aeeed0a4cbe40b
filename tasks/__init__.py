"""compalign tasks: pure, typed functions that do the work of the flows (testable without Ray)."""
