"""Adapter methods; importing this package registers all of them (see base.py)."""

from trainer.methods import adalora, aroma, dora, edora, lora, mor  # noqa: F401
from trainer.methods.base import (
    REGISTRY,
    AdapterLayer,
    Controller,
    MethodConfig,
    get_method,
    make_config,
    register,
)

__all__ = ["REGISTRY", "AdapterLayer", "Controller", "MethodConfig", "get_method", "make_config", "register"]
