"""The one exception type the runtime and the exporter raise for user-facing problems."""


class MedusaError(Exception):
    """A problem with the user's input: printed as one line by the CLI, never as a traceback."""
