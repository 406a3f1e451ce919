"""Where images go: docker-archive streams and files, OCI layouts, registries."""
