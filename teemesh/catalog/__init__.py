"""The catalog: a small store contract (``store``) with an embedded and an etcd backend.

Backends are imported by name (``teemesh.catalog.sqlite``, ``teemesh.catalog.etcd``), so using
one never loads the other.
"""
