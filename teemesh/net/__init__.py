"""The network edge: attested HTTPS clients, listeners and relays."""
