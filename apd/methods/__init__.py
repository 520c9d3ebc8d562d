"""Decomposition methods by name: each a room of its own (config, component model, losses, masks).

``METHODS`` maps a registry name to its ``Method`` class; ``method_for(config)`` picks the method of
a config, and ``config_class(name)`` the config class of a name. A duplicate name raises.
"""

from apd.config import ConfigError, MethodConfig
from apd.methods.apd import APD, APDConfig
from apd.methods.base import Factors, InstanceView, Method, MLPUnits, StepContext, Units
from apd.methods.spd import SPD, SPDConfig

__all__ = ["METHODS", "register_method", "method_for", "method_class", "is_method", "config_class", "Method", "StepContext", "Factors",
           "InstanceView", "Units", "MLPUnits", "APD", "APDConfig", "SPD", "SPDConfig"]  # fmt: skip

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise ValueError(f"a method named {cls.name!r} is already registered ({METHODS[cls.name].__name__})")
    METHODS[cls.name] = cls
    return cls


register_method(APD)
register_method(SPD)


def method_for(config: MethodConfig) -> Method:
    """The method object that trains with ``config`` (chosen by the config's class)."""
    for cls in METHODS.values():
        if type(config) is cls.config_class:
            return cls(config)
    raise TypeError(f"config must be a method config ({', '.join(c.config_class.__name__ for c in METHODS.values())}), "
                    f"got {type(config).__name__}")  # fmt: skip


def method_class(name: str) -> type[Method]:
    """The method class registered as ``name`` (e.g. a results row's ``method``); a clear error otherwise."""
    if name not in METHODS:
        raise ConfigError(f"method {name!r} is not known; choose one of {sorted(METHODS)}")
    return METHODS[name]


def is_method(name: str) -> bool:
    """Whether ``name`` is a registered method (a results row of a decomposition, not of an SAE grid)."""
    return name in METHODS


def config_class(name: str) -> type[MethodConfig]:
    if name not in METHODS:
        raise ConfigError(f"method {name!r} is not known; choose one of {sorted(METHODS)}")
    return METHODS[name].config_class
