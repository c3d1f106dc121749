"""Ray Serve shims over :mod:`serve.core`: deployments, the stream-affinity router, ingest host actors, the app."""
