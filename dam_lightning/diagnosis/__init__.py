"""The domain gap of a source network, layer by layer, before adapting it: Gaussian gaps and
discriminability (proxy A-distance) of F_s's activations on source vs target data, the same after
Gaussian matching, and the paper's Fig. 3 histograms. The gaps show where a domain gap is left;
they do not choose the layers GAM matches (docs/configuration.md).

It only measures: the network it is given is never changed (Gaussian matching runs on a copy).
The statistics are those of ``dam_lightning.matching.statistics``: nothing here computes them
a second way.
"""

from dam_lightning.diagnosis.discriminability import Discriminability, discriminability
from dam_lightning.diagnosis.engine import diagnose, diagnose_datamodule
from dam_lightning.diagnosis.result import (
    FILES,
    ChannelHistogram,
    Diagnosis,
    LayerDiagnosis,
)

__all__ = [
    "FILES",
    "ChannelHistogram",
    "Diagnosis",
    "Discriminability",
    "LayerDiagnosis",
    "diagnose",
    "diagnose_datamodule",
    "discriminability",
]
