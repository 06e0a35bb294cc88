"""Scripts a person runs (``uv run exp/<name>.py --help``); each only calls ``core.commands.<name>.main``."""
