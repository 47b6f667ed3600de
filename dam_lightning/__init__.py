"""dam_lightning: deep activation matching (GAM) for unsupervised domain adaptation."""

__version__ = "0.1.0"
