"""The default charrnn plugins, installed as `charrnn_plugins` and registered as builtins."""
