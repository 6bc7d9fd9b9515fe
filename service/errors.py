"""The exceptions a request can meet before it streams, shared by the engine, the repository and the frontends.

Free of TensorFlow, so a frontend process that owns no model can raise and map them
(``service/request.py`` maps each to the status a client sees).
"""

from __future__ import annotations


class CapacityError(Exception):
    """Over max_concurrent + max_queue (RESOURCE_EXHAUSTED)."""


class EngineClosedError(Exception):
    """The engine is shutting down, or gone, and takes no new requests (UNAVAILABLE)."""


class ModelNotFoundError(LookupError):
    """The request names a model or version that is not loaded (NOT_FOUND)."""


class NoModelLoadedError(LookupError):
    """No model version is loaded yet (UNAVAILABLE)."""
