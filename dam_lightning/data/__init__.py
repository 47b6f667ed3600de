"""Datasets (one file per family), the class tables and the domain-adaptation DataModule."""

from dam_lightning.data.augment import RandomAffine
from dam_lightning.data.datamodule import DomainAdaptationDataModule, Unlabelled
from dam_lightning.data.digits import MNIST, USPS, SynDigits, UCIDigits
from dam_lightning.data.label_shift import LabelShift

__all__ = [
    "MNIST",
    "USPS",
    "DomainAdaptationDataModule",
    "LabelShift",
    "RandomAffine",
    "SynDigits",
    "UCIDigits",
    "Unlabelled",
]
