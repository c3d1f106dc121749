"""The HTTP layer (FastAPI): routes over a :class:`serve.http.app.StreamBackend`, and the Python client."""
