"""String registry of methods: CLI name -> class (DESIGN.md)."""

from __future__ import annotations

from ..errors import UqloraError
from .base import Adapter, Method
from .blob import BlobMethod
from .clora import CLoraMethod
from .ensemble import EnsembleMethod, MultiSwagMethod
from .laplace import LaplaceMethod, LastLayerLaplaceMethod
from .map import MapMethod, ZeroShotMethod
from .mc_dropout import McDropoutMethod
from .sft import SftFullMethod, SftMethod
from .swag import SwagMethod, SwagScaleMethod, SwaMethod
from .temperature import TemperatureMethod

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (
    MapMethod, ZeroShotMethod, McDropoutMethod, SwaMethod, SwagMethod, SwagScaleMethod, EnsembleMethod,
    MultiSwagMethod, SftMethod, SftFullMethod, LaplaceMethod, LastLayerLaplaceMethod, TemperatureMethod,
    CLoraMethod, BlobMethod)}


def get_method(name: str, config=None) -> Method:
    """The method called `name`, configured by the run's TrainConfig."""
    if name not in METHODS:
        raise UqloraError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name](config)

