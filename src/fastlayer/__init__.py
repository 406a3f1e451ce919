"""fastlayer: native-accelerated builder of layered container images."""

from fastlayer.errors import FastlayerError

__version__ = "0.1.0"

__all__ = ["FastlayerError", "__version__"]
