"""Datasets (one file per family), the class tables and the domain-adaptation DataModule."""

from dam_lightning.data.attributes import dataset_info
from dam_lightning.data.augment import RandomAffine
from dam_lightning.data.cityscapes import Cityscapes
from dam_lightning.data.datamodule import DomainAdaptationDataModule, Unlabelled
from dam_lightning.data.digit_scenes import DigitScenes
from dam_lightning.data.digits import MNIST, USPS, SynDigits, UCIDigits
from dam_lightning.data.few_shot import FewShot
from dam_lightning.data.gta5 import GTA5
from dam_lightning.data.label_shift import LabelShift
from dam_lightning.data.labels import DatasetInfo
from dam_lightning.data.random_part import RandomPart
from dam_lightning.data.segmentation import SegmentationDataset
from dam_lightning.data.synthia import SYNTHIA
from dam_lightning.data.transforms import SegmentationTransform

__all__ = [
    "GTA5",
    "MNIST",
    "SYNTHIA",
    "USPS",
    "Cityscapes",
    "DatasetInfo",
    "DigitScenes",
    "DomainAdaptationDataModule",
    "FewShot",
    "LabelShift",
    "RandomAffine",
    "RandomPart",
    "SegmentationDataset",
    "SegmentationTransform",
    "SynDigits",
    "UCIDigits",
    "Unlabelled",
    "dataset_info",
]
