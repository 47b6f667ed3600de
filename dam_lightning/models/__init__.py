"""Networks: plain ``nn.Module``s, built as ``Net(num_classes, ...)``."""

from dam_lightning.models.erfnet import ERFNet
from dam_lightning.models.lenet import LeNet
from dam_lightning.models.torchvision import TorchvisionSegmentation

__all__ = ["ERFNet", "LeNet", "TorchvisionSegmentation"]
