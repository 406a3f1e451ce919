"""The one exception type for user errors: the CLI prints it as one line and exits 1."""


class FastlayerError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


class DigestMismatch(FastlayerError):
    """Bytes read do not hash to the digest their image promised."""


class CacheMismatch(FastlayerError):
    """A layer's bytes hash to other than the diff_id a layer cache gave for them,
    after a sink had relied on it (named an entry after it): the output is void."""

    def __init__(self, expected: str, got: str):
        super().__init__(
            f"a layer hashed to {got}, not the {expected} the layer cache recorded for "
            "its recipe (was a store path changed in place?): the entry is dropped, "
            "run the build again"
        )
        self.expected, self.got = expected, got
