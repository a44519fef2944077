"""The coordinator: attested admission, the mesh CA and the catalog API."""
