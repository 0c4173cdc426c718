"""The core's commands, one module per noun; plugins add theirs through ``register_commands``."""
