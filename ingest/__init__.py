"""The ingest API: HTTP (Starlette) and the same operations as a Python API."""
