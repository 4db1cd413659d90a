"""Tools agents call: the registry (`registry`), built-in plugins (`builtin`) and the bridge to
pydantic-ai (`toolset`)."""
