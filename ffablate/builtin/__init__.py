"""The built-in plugins, one module per kind, registered exactly like third-party plugins."""
