"""teemesh: an attested service mesh for confidential VMs."""

__version__ = "0.1.0"
__all__ = ["__version__"]
