"""The one exception type for user errors: the CLI prints it as one line and exits 1."""


class FastlayerError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""
