"""Inputs of an image that are read, never written: base images, trees, generated files."""
