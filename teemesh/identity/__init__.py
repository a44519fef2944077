"""Identities: RA-TLS certificate extensions, SPIFFE ids, the mesh CA, one TLS-context factory."""
