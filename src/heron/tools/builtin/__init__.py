"""The built-in tools, each a plugin module with `register_tools(registry)`."""
