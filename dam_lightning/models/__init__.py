"""Networks: plain ``nn.Module``s, built as ``Net(num_classes, ...)``."""

from dam_lightning.models.lenet import LeNet

__all__ = ["LeNet"]
