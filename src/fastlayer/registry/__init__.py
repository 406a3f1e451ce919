"""Talking to OCI distribution registries: pull by digest, push what is missing.

`reference` parses image references, `auth` finds credentials and answers
WWW-Authenticate challenges, `client` is the HTTP side (requests), `cache`
remembers which blob holds which layer, `pull` and `push` drive them.
"""
