"""The one exception type for user errors: the CLI prints it as one line and exits 1."""


class FastlayerError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


class DigestMismatch(FastlayerError):
    """Bytes read do not hash to the digest their image promised."""
