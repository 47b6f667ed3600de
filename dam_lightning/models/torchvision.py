"""Adapter: a torchvision segmentation model as a plain network whose forward returns the logits
tensor (not torchvision's ``OrderedDict(out=...)``), so taps, Gaussian matching and the task see
it like any other net. It never downloads: weights come only from local files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch  # noqa: F401 (the doctests use it)
from torch import Tensor, nn

from dam_lightning import weights
from dam_lightning.errors import ConfigError, MissingFileError
from dam_lightning.weights import strip_prefix

ARCHITECTURES = (
    "lraspp_mobilenet_v3_large",
    "deeplabv3_mobilenet_v3_large",
    "deeplabv3_resnet50",
    "fcn_resnet50",
)


class TorchvisionSegmentation(nn.Module):
    """A torchvision segmentation model (``torchvision.models.segmentation.<arch>``) with the
    auxiliary classifier off, whose forward returns the logits (N, classes, H, W) at the input
    size. The torchvision model is the submodule ``model``, so every layer name starts with
    ``model.``.

    Good tap names (each returns one tensor; strides for an input of stride 1):

    - ``lraspp_mobilenet_v3_large``: ``model.backbone.4`` (40 ch, 1/8, the head's "low"
      input), ``model.backbone.16`` (960 ch, 1/16, "high"), ``model.classifier.cbr`` (128 ch,
      1/16), ``model.classifier`` (logits, 1/8).
    - ``deeplabv3_mobilenet_v3_large``: ``model.backbone.4`` (40 ch, 1/8),
      ``model.backbone.16`` (960 ch, 1/16), ``model.classifier.0`` (ASPP, 256 ch),
      ``model.classifier.3`` (256 ch after BN + ReLU), ``model.classifier`` (logits, 1/16).
    - ``deeplabv3_resnet50``: ``model.backbone.layer1`` .. ``model.backbone.layer4`` (256, 512,
      1024, 2048 ch; 1/4, then 1/8 for the dilated layer2-4), ``model.classifier.0`` (ASPP),
      ``model.classifier.3`` (256 ch), ``model.classifier`` (logits, 1/8).
    - ``fcn_resnet50``: ``model.backbone.layer1`` .. ``model.backbone.layer4`` as above,
      ``model.classifier.2`` (512 ch after BN + ReLU), ``model.classifier`` (logits, 1/8).

    ``model.backbone`` itself returns a dict and cannot be tapped. Gaussian matching folds into
    the BatchNorms and biased convolutions (``foldable_layers``).

    Args:
        num_classes: number of output classes.
        arch: one of ``ARCHITECTURES``.
        weights: a local file holding the whole model: a state dict in torchvision's layout
            (``backbone.*``, ``classifier.*``; ``aux_classifier.*`` is ignored), this adapter's
            state dict (``model.*``), or a SourceModule/GAM checkpoint (``net.``/``target_net.``).
        backbone_weights: a local file holding the backbone's classification model (e.g.
            torchvision's ImageNet ``mobilenet_v3_large`` or ``resnet50`` state dict; its
            classifier/fc is dropped) or the ``backbone.*`` state dict itself.
        example_input_shape: one input's (C, H, W), for sizing discriminators with a dry forward.

    Example:
        >>> net = TorchvisionSegmentation(19)
        >>> net.eval()(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 19, 64, 64])
    """

    def __init__(
        self,
        num_classes: int,
        arch: str = "lraspp_mobilenet_v3_large",
        weights: str | None = None,
        backbone_weights: str | None = None,
        example_input_shape: Sequence[int] = (3, 512, 1024),
    ):
        super().__init__()
        self.arch = arch
        self.model = build_torchvision_model(arch, num_classes)
        self.example_input_shape = tuple(example_input_shape)
        if backbone_weights is not None:
            load_backbone_weights(self.model, arch, backbone_weights)
        if weights is not None:
            load_model_weights(self.model, weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)["out"]


def build_torchvision_model(arch: str, num_classes: int) -> nn.Module:
    """``torchvision.models.segmentation.<arch>`` with random weights, no auxiliary classifier
    and no download (``weights=None, weights_backbone=None``).

    Example:
        >>> type(build_torchvision_model("fcn_resnet50", 3).classifier).__name__
        'FCNHead'
    """
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown arch {arch!r}: use one of {', '.join(ARCHITECTURES)}")
    from torchvision.models import segmentation  # a second of import time: only when used

    builder = getattr(segmentation, arch)
    return builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)


def load_model_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a whole torchvision segmentation model from a local file (see
    ``TorchvisionSegmentation``'s ``weights``); raises naming the file if it does not fit."""
    state = strip_prefix(read_state_dict(path, "TorchvisionSegmentation weights"), "model.")
    state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
    _load_strict(model, state, path, "was it saved from the same arch and num_classes?")


def load_backbone_weights(model: nn.Module, arch: str, path: str | os.PathLike) -> None:
    """Load ``model.backbone`` from a classification model's state dict (MobileNetV3's
    ``features.*``, ResNet's layers; the classifier/fc is dropped) or from the backbone's own
    state dict; raises naming the file if it does not fit."""
    state = read_state_dict(path, "TorchvisionSegmentation backbone_weights")
    if "mobilenet" in arch:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        state = strip_prefix(state, "features.")
    else:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    state = strip_prefix(state, "backbone.")
    backbone = arch.split("_", 1)[1]
    _load_strict(model.backbone, state, path, f"is it a {backbone} state dict?")


def read_state_dict(path: str | os.PathLike, setting: str = "weights") -> dict[str, Tensor]:
    """The state dict in a local file: a plain one, or a Lightning checkpoint's ``state_dict``
    with its ``net.`` (SourceModule) or ``target_net.`` (GAM) prefix removed. The file is read
    as weights only (``dam_lightning.weights``): one holding other Python objects is refused,
    and nothing in it runs.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     torch.save({"state_dict": {"net.w": torch.ones(1)}}, f"{folder}/a.ckpt")
        ...     list(read_state_dict(f"{folder}/a.ckpt"))
        ['w']
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFileError(
            f"{setting} file {path} does not exist; pass the path of a local state dict or "
            "checkpoint (torchvision downloads are never made here), or None"
        )
    return weights.read_state_dict(path, setting)


def _load_strict(module: nn.Module, state: dict[str, Tensor], path, hint: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        first_lines = "; ".join(str(err).splitlines()[:3])
        raise ConfigError(
            f"{os.fspath(path)} does not fit {type(module).__name__} ({hint}): {first_lines}"
        ) from err
