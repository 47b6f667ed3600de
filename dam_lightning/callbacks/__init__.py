"""Callbacks: Gaussian matching at epoch start, the adaptation summary table, prediction files,
the stable path a finished stage leaves its network under, the validation dashboard, and a
training bar that counts the whole run."""

from dam_lightning.callbacks.dashboard import ValidationDashboard
from dam_lightning.callbacks.gaussian_matching import GaussianMatching
from dam_lightning.callbacks.predictions import PredictionWriter
from dam_lightning.callbacks.progress import RunProgress, RunProgressBar
from dam_lightning.callbacks.publish import PublishCheckpoint
from dam_lightning.callbacks.stage_overlays import StageOverlays
from dam_lightning.callbacks.summary import AdaptationSummary

__all__ = [
    "AdaptationSummary",
    "GaussianMatching",
    "PredictionWriter",
    "PublishCheckpoint",
    "RunProgress",
    "RunProgressBar",
    "StageOverlays",
    "ValidationDashboard",
]
