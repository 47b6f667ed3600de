"""LeNet exactly as in the paper's digits code (ADDA's LeNet); nothing domain-specific here."""

from __future__ import annotations

from torch import Tensor, nn


class LeNet(nn.Module):
    """LeNet for 1x28x28 digits in [0, 1].

    conv1: 20@5x5 VALID, ReLU, maxpool 2 / conv2: 50@5x5, ReLU, maxpool 2 /
    fc3: 500 + ReLU / fc4: ``num_classes`` logits.

    The submodules are grouped so that GAM's tap points are plain names: ``fc3`` is the 500-d
    activation after its ReLU and ``fc4`` the logits (the layers the official code matches).
    Gaussian matching folds into the Conv/Linear inside them (``conv1.0``, ..., ``fc4``).

    Example:
        >>> import torch
        >>> LeNet(10)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    example_input_shape = (1, 28, 28)
    """One input's shape, used to build discriminators from the tapped activations' shapes."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.fc3 = nn.Sequential(nn.Flatten(), nn.Linear(50 * 4 * 4, 500), nn.ReLU())
        self.fc4 = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc4(self.fc3(self.conv2(self.conv1(x))))
