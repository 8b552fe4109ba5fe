"""The vhost-user-vsock backend (a separate process) and the host-side vsock API.

Kept import-light on purpose: the backend process, the lab and tests each pull in only the
modules they need (``vmlab.vsock.host`` for tests, ``vmlab.vsock.process`` for the lab).
"""
