"""The service around the model packages, in layers (a file's folder says what it needs):

* :mod:`serve.core` -- plain classes, no Ray, no FastAPI: the stages, the one stream flow, ingest, stream hosts,
  watches, typed messages and the validated config. Everything runs in one process from here.
* :mod:`serve.http` -- the FastAPI app over a stream backend (REST, SSE, OpenAI-compatible routes, web console) and
  the Python client.
* :mod:`serve.deploy` -- thin Ray Serve shims: deployments over the core stages, the stream-affinity router, ingest
  host actors, ``build_app(config)``.
* :mod:`serve.cli` -- the ``stc-serve`` command.
* :mod:`serve.eval` -- streaming accuracy on OVO-Bench / StreamingBench files and a synthetic benchmark generator.
"""
