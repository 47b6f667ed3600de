"""Callbacks: Gaussian matching at epoch start, the adaptation summary table, prediction files,
the stable path a finished stage leaves its network under, and the validation dashboard."""

from dam_lightning.callbacks.dashboard import ValidationDashboard
from dam_lightning.callbacks.gaussian_matching import GaussianMatching
from dam_lightning.callbacks.predictions import PredictionWriter
from dam_lightning.callbacks.publish import PublishCheckpoint
from dam_lightning.callbacks.stage_overlays import StageOverlays
from dam_lightning.callbacks.summary import AdaptationSummary

__all__ = [
    "AdaptationSummary",
    "GaussianMatching",
    "PredictionWriter",
    "PublishCheckpoint",
    "StageOverlays",
    "ValidationDashboard",
]
