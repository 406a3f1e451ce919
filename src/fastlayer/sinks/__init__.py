"""Where images go: docker-archive streams and files, OCI layouts, registries.

`open_sink` picks the sink for an output format; every sink speaks the
interface in sinks.base. Used as

    with open_sink("out.tar", "docker-archive") as sink:
        layers = [sink.add_layer(src, comment) for src, comment in ...]
        record = sink.finish(config, ["reg.example:5000/app:1"])

Output is atomic: on any error (or if finish() was never called) nothing
is left at the output path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fastlayer.errors import FastlayerError
from fastlayer.sinks.base import ImageSink

FORMATS = ("docker-archive", "oci-dir", "oci-archive")


@contextlib.contextmanager
def open_sink(
    output: str | None,
    format: str = "docker-archive",
    compress: str = "none",
    name: str = "",
    tag: str = "",
    mtime: int = 0,
) -> Iterator[ImageSink]:
    """A sink writing one image to output (None or "-": stdout, archives only).

    compress: "none", "gzip", "zstd", or "auto" (by output extension). For a
    docker-archive it compresses the whole archive; for OCI formats, each
    layer blob (OCI media types say so). name/tag: the image's reference when
    finish() is given no repo_tags. mtime: of the archive's own entries."""
    from fastlayer.sinks.compress import kind_for

    kind = kind_for(output, compress)
    if format == "docker-archive":
        from fastlayer.sinks.docker_image import docker_archive_sink

        opened = docker_archive_sink(output, kind, name, tag, mtime)
    elif format == "oci-archive":
        from fastlayer.sinks.oci import oci_archive_sink

        opened = oci_archive_sink(output, kind, name, tag, mtime)
    elif format == "oci-dir":
        from fastlayer.sinks.oci import oci_dir_sink

        if output in (None, "-"):
            raise FastlayerError("--format oci-dir needs an output directory (-o DIR)")
        opened = oci_dir_sink(output, kind, name, tag)
    else:
        raise FastlayerError(f"unknown output format {format!r}; use one of {', '.join(FORMATS)}")
    with opened as sink:
        yield sink
