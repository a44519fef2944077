"""The gateway: routes TLS connections by SNI to apps, the way dstack's gateway does."""
