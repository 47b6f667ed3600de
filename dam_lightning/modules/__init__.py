"""LightningModules: they orchestrate the networks and the algorithm, and contain neither."""

from dam_lightning.modules.gam import GAMAdaptModule
from dam_lightning.modules.source import SourceModule

__all__ = ["GAMAdaptModule", "SourceModule"]
