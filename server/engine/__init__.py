"""The engine: the resident base model stepped in its own thread, and the HTTP layer's only door to it.

``core`` (the loop: submit, reap, classify batch, one generate step), ``scheduler`` (continuous batching,
fair between adapters), ``admission`` (where a request gets its adapter slot), ``request`` and ``tokens``
(per-request state), ``sampler``, ``output`` (detokenise, stop rules), ``classify`` (batched classification).
"""

from server.common.config import EngineConfig
from server.engine.core import Engine
from server.engine.request import GenerateEvent, GenerateParams, RequestHandle

__all__ = ["Engine", "EngineConfig", "GenerateEvent", "GenerateParams", "RequestHandle"]
