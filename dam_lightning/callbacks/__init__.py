"""Callbacks: Gaussian matching at epoch start, and the adaptation summary table."""

from dam_lightning.callbacks.gaussian_matching import GaussianMatching
from dam_lightning.callbacks.predictions import PredictionWriter
from dam_lightning.callbacks.summary import AdaptationSummary

__all__ = ["AdaptationSummary", "GaussianMatching", "PredictionWriter"]
