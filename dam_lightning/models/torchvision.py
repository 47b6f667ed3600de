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
from dam_lightning.weights import DATA_PARALLEL, Translated, load_state, strip_prefix

ARCHITECTURES = (
    "lraspp_mobilenet_v3_large",
    "deeplabv3_mobilenet_v3_large",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "fcn_resnet50",
    "fcn_resnet101",
)


class TorchvisionSegmentation(nn.Module):
    """A torchvision segmentation model (``torchvision.models.segmentation.<arch>``) whose
    forward returns the main head's logits (N, classes, H, W) at the input size. The torchvision
    model is the submodule ``model``, so every layer name starts with ``model.``: a GAM config
    taps ResNet's third stage as ``layers: {model.backbone.layer3: 1.0}``.

    Good tap names (each returns one tensor; channels, then stride relative to the input):

    - ``deeplabv3_resnet50``, ``deeplabv3_resnet101``: ``model.backbone.layer1`` (256 ch,
      1/4), ``model.backbone.layer2`` (512 ch, 1/8), ``model.backbone.layer3`` (1024 ch, 1/8,
      dilated: what torchvision's auxiliary head reads), ``model.backbone.layer4`` (2048 ch,
      1/8, dilated: the head's input), ``model.classifier.0`` (ASPP, 256 ch),
      ``model.classifier.3`` (256 ch after BN + ReLU), ``model.classifier`` (logits, 1/8).
    - ``fcn_resnet50``, ``fcn_resnet101``: ``model.backbone.layer1`` .. ``model.backbone.layer4``
      as above, ``model.classifier.2`` (512 ch after BN + ReLU), ``model.classifier`` (logits,
      1/8).
    - ``deeplabv3_mobilenet_v3_large``: ``model.backbone.4`` (40 ch, 1/8),
      ``model.backbone.16`` (960 ch, 1/16, the head's input), ``model.classifier.0`` (ASPP,
      256 ch), ``model.classifier.3`` (256 ch after BN + ReLU), ``model.classifier`` (logits,
      1/16).
    - ``lraspp_mobilenet_v3_large``: ``model.backbone.4`` (40 ch, 1/8, the head's "low"
      input), ``model.backbone.16`` (960 ch, 1/16, "high"), ``model.classifier.cbr`` (128 ch,
      1/16), ``model.classifier`` (logits, 1/8).
    - every one: ``output``, the logits at the input size.

    Blocks inside a stage are taps too (``model.backbone.layer3.22``: ResNet-101's last block
    of layer3, which has 23; ResNet-50's has 6); a block's own ``relu`` runs three times, so tap
    the block. ``model.backbone`` itself returns a dict and cannot be tapped. Gaussian matching
    folds into the BatchNorms and biased convolutions (``foldable_layers``).

    The auxiliary classifier (torchvision's ``aux_loss=True``: an FCN head on layer3 for the
    ResNets, on ``backbone.4`` for DeepLabV3-MobileNet; LR-ASPP has none) is never built, so it
    is never in the logits: no task here trains it, and built it would either run for nothing
    (parameters without a gradient under DDP) or sit unrun (BatchNorms Gaussian matching would
    wait on). A file that holds one (``aux_classifier.*``, torchvision's COCO files, or a model
    built with ``aux_loss=True``) loads: those keys are dropped, and the log says so.

    Args:
        num_classes: number of output classes.
        arch: one of ``ARCHITECTURES``.
        weights: a local file holding the whole model: a state dict in torchvision's layout
            (its own files, e.g. ``deeplabv3_resnet101_coco-586e9e4e.pth``: ``backbone.*``,
            ``classifier.*``; ``aux_classifier.*`` is dropped), this adapter's state dict
            (``model.*``), or a SourceModule/GAM checkpoint (``net.``/``target_net.``); or the
            backbone's ImageNet classification model (as ``backbone_weights``), the classifier
            then left initialised. Never a download (``translate_weights``).
        backbone_weights: a local file holding the backbone's classification model (e.g.
            torchvision's ImageNet ``mobilenet_v3_large``, ``resnet50`` or ``resnet101`` state
            dict, ``resnet101-cd907fc2.pth``; its classifier/fc is dropped) or the
            ``backbone.*`` of a segmentation model's state dict.
        example_input_shape: one input's (C, H, W), for sizing discriminators with a dry forward.
        skip_mismatched_classifier: load everything but a classifier of another class count
            (e.g. COCO's 21 classes into 19): it starts initialised, and the log says so. Off,
            such a file is an error that names this option.
        channels_last: keep the convolution weights and the activations in the channels-last
            memory format (NHWC), which cuDNN's fastest convolutions (tensor cores under
            bf16/fp16) read directly; the same outputs within float rounding.

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
        skip_mismatched_classifier: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        self.arch = arch
        self.model = build_torchvision_model(arch, num_classes)
        self.example_input_shape = tuple(example_input_shape)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if backbone_weights is not None:
            load_backbone_weights(self, backbone_weights)
        if weights is not None:
            load_model_weights(self, weights, skip_mismatched_classifier)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)["out"]

    def classifier_layers(self) -> tuple[str, ...]:
        """The layers whose outputs are the classes: LR-ASPP's two, else the head's last conv.

        Example:
            >>> TorchvisionSegmentation(4).classifier_layers()
            ('model.classifier.low_classifier', 'model.classifier.high_classifier')
        """
        if self.arch.startswith("lraspp"):
            return ("model.classifier.low_classifier", "model.classifier.high_classifier")
        return ("model.classifier.4",)  # DeepLabHead's and FCNHead's final 1x1 conv

    def translate_weights(self, state: dict[str, Tensor]) -> Translated:
        """torchvision's layouts in this adapter's (``model.*``): a segmentation model's state
        dict (``backbone.*``, ``classifier.*``; its ``aux_classifier.*`` dropped, as this
        adapter has none), or the backbone's ImageNet classification model, loaded into the
        backbone only with the classifier left initialised (``backbone_state``).

        Example:
            >>> net = TorchvisionSegmentation(4)
            >>> state = {k[6:]: v for k, v in net.state_dict().items()}  # torchvision's keys
            >>> sorted(net.translate_weights(state).state) == sorted(net.state_dict())
            True
        """
        state = strip_prefix(state, "model.")
        notes: list[str] = []
        initialised: tuple[str, ...] = ()
        if "aux_classifier." in {_head(k) for k in state}:
            state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
            notes.append("dropped aux_classifier.* (this adapter has no auxiliary classifier)")
        elif "backbone." not in {_head(k) for k in state}:
            backbone = backbone_state(state, self.arch)
            if backbone is not state:  # a classification model: its features only
                state, initialised = {f"backbone.{k}": v for k, v in backbone.items()}, (
                    "model.classifier.",
                )
                notes.append(
                    f"the {self.arch.split('_', 1)[1]} classification model loaded into the "
                    "backbone only; the segmentation head starts initialised"
                )
        return Translated({f"model.{k}": v for k, v in state.items()}, initialised, tuple(notes))


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


def load_model_weights(
    net: TorchvisionSegmentation, path: str | os.PathLike, skip_mismatched_classifier=False
) -> None:
    """Load the whole adapter from a local file (see ``TorchvisionSegmentation``'s
    ``weights``); raises naming ``weights`` and the file if it does not fit."""
    path = os.fspath(path)
    _must_exist(path, "weights")
    weights.load_network_weights(
        net, path, setting="weights", skip_mismatched_classifier=skip_mismatched_classifier
    )


def load_backbone_weights(net: TorchvisionSegmentation, path: str | os.PathLike) -> None:
    """Load ``net.model.backbone`` from a classification model's state dict (MobileNetV3's
    ``features.*``, ResNet's layers; the classifier/fc is dropped) or from the ``backbone.*`` of
    a segmentation model's; raises naming ``backbone_weights`` and the file if it does not fit.
    """
    path = os.fspath(path)
    state = strip_prefix(read_state_dict(path, "backbone_weights"), DATA_PARALLEL)
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    else:
        state = backbone_state(state, net.arch)
    backbone = net.arch.split("_", 1)[1]
    load_state(
        net,
        {f"model.backbone.{k}": v for k, v in state.items()},
        path,
        "backbone_weights",
        initialised=("model.classifier.",),
        translate=False,
        fix=f"is it a {backbone} state dict (torchvision's ImageNet {backbone}, or the "
        f"backbone.* of a segmentation model on {backbone})?",
    )


def backbone_state(state: dict[str, Tensor], arch: str) -> dict[str, Tensor]:
    """The backbone's keys in a torchvision classification model's state dict: MobileNetV3's
    ``features.*`` (``classifier.*`` dropped), ResNet's all but ``fc.*``; ``state`` itself
    when it holds neither.

    Example:
        >>> backbone_state({"features.0.w": 1, "classifier.0.w": 2}, "lraspp_mobilenet_v3_large")
        {'0.w': 1}
        >>> backbone_state({"conv1.weight": 1, "fc.weight": 2}, "deeplabv3_resnet101")
        {'conv1.weight': 1}
    """
    if "mobilenet" in arch and any(k.startswith("features.") for k in state):
        features = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        return strip_prefix(features, "features.")
    if "resnet" in arch and any(k.startswith("fc.") for k in state):
        return {k: v for k, v in state.items() if not k.startswith("fc.")}
    return state


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
    _must_exist(path, setting)
    return weights.read_state_dict(path, setting)


def _must_exist(path: str, setting: str) -> None:
    if not os.path.exists(path):
        raise MissingFileError(
            f"{setting}: {path} does not exist; pass the path of a local state dict or "
            "checkpoint (torchvision downloads are never made here), or null"
        )


def _head(key: str) -> str:
    return key.split(".", 1)[0] + "."
