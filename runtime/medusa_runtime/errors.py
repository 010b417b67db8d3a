"""The exception types the runtime and the exporter raise for user-facing problems."""


class MedusaError(Exception):
    """A problem with the user's input: printed as one line by the CLI, never as a traceback."""


class BackendError(MedusaError):
    """The inference engine failed on a valid request (out of device memory, a kernel's error): one line
    too, but the server answers it as its own failure (500), not the client's (400)."""
