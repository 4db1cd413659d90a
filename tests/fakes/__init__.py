"""Real servers that stand in for outside services in tests (see each module's docstring)."""
