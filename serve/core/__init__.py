"""The plain layer of the service: stateful classes and typed messages, importing neither Ray nor FastAPI.

A stream's life is one definition (:class:`serve.core.flow.StageFlow`): open -> encode -> append -> ask -> close, over
a :class:`serve.core.flow.StageTransport` (direct calls in-process; Ray handles in :mod:`serve.deploy`).
"""
