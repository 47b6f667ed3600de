"""ERFNet (Romera et al., 2017) laid out as the paper's segmentation network: 17 sequential layers
in the encoder, an optional decoder, module names that make the paper's taps plain dotted names.

Plain torch: nothing domain-specific, no download. Weights come only from a local file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dam_lightning.errors import ConfigError, MissingFileError
from dam_lightning.weights import Translated, load_network_weights

BATCHNORM_EPS = 1e-3  # as in the original ERFNet
ENCODER_DROPOUT = (0.03, 0.3)  # the original's dropout in the 64- and 128-channel blocks
DILATIONS = (2, 4, 8, 16)  # of the 128-channel blocks, repeated twice
OUTPUT_STRIDE = 8  # three downsamplers


class DownsamplerBlock(nn.Module):
    """Halve the resolution: concat(conv 3x3 stride 2 to ``out - in`` channels, maxpool 2),
    then BatchNorm and ReLU. The conv's output is only part of the block's channels; its bias
    still takes a per-channel correction, because the concat keeps channels apart.

    Example:
        >>> DownsamplerBlock(3, 16)(torch.zeros(1, 3, 8, 8)).shape
        torch.Size([1, 16, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        if out_channels <= in_channels:
            raise ConfigError(
                f"a downsampler needs more output than input channels, got {in_channels} -> "
                f"{out_channels}: the conv supplies out - in of them (raise ERFNet's width)"
            )
        self.conv = nn.Conv2d(in_channels, out_channels - in_channels, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2, stride=2)
        self.bn = nn.BatchNorm2d(out_channels, eps=BATCHNORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(torch.cat([self.conv(x), self.pool(x)], dim=1)))


class NonBottleneck1d(nn.Module):
    """ERFNet's residual block of factorised convolutions: conv3x1, ReLU, conv1x3, BN, ReLU,
    conv3x1 (dilated), ReLU, conv1x3 (dilated), BN, dropout, + input, ReLU.

    Example:
        >>> NonBottleneck1d(8, dilation=2, dropout=0.3)(torch.zeros(1, 8, 6, 6)).shape
        torch.Size([1, 8, 6, 6])
    """

    def __init__(self, channels: int, dilation: int = 1, dropout: float = 0.0):
        super().__init__()
        d = dilation
        self.conv3x1_1 = nn.Conv2d(channels, channels, (3, 1), padding=(1, 0))
        self.conv1x3_1 = nn.Conv2d(channels, channels, (1, 3), padding=(0, 1))
        self.bn1 = nn.BatchNorm2d(channels, eps=BATCHNORM_EPS)
        self.conv3x1_2 = nn.Conv2d(channels, channels, (3, 1), padding=(d, 0), dilation=(d, 1))
        self.conv1x3_2 = nn.Conv2d(channels, channels, (1, 3), padding=(0, d), dilation=(1, d))
        self.bn2 = nn.BatchNorm2d(channels, eps=BATCHNORM_EPS)
        # Identity rather than Dropout2d(0): a zero-probability dropout still draws a mask.
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1x3_1(torch.relu(self.conv3x1_1(x)))
        out = torch.relu(self.bn1(out))
        out = self.conv1x3_2(torch.relu(self.conv3x1_2(out)))
        out = self.dropout(self.bn2(out))
        return torch.relu(out + x)


class UpsamplerBlock(nn.Module):
    """Double the resolution: ConvTranspose 3x3 stride 2 (padding 1, output padding 1), BN, ReLU.

    Example:
        >>> UpsamplerBlock(8, 4)(torch.zeros(1, 8, 3, 5)).shape
        torch.Size([1, 4, 6, 10])
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(
            in_channels, out_channels, 3, stride=2, padding=1, output_padding=1
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=BATCHNORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)))


class ERFNetEncoder(nn.Module):
    """``initial_block`` (paper layer 1), ``layers.0`` .. ``layers.14`` (paper layers 2-16) and,
    for the encoder-only model, the 1x1 classifier ``output_conv`` (paper layer 17)."""

    def __init__(
        self,
        channels: tuple[int, int, int],
        dropout: tuple[float, float],
        num_classes: int | None,
    ):
        super().__init__()
        c16, c64, c128 = channels
        self.initial_block = DownsamplerBlock(3, c16)
        self.layers = nn.Sequential(
            DownsamplerBlock(c16, c64),
            *(NonBottleneck1d(c64, 1, dropout[0]) for _ in range(5)),
            DownsamplerBlock(c64, c128),
            *(NonBottleneck1d(c128, d, dropout[1]) for _ in range(2) for d in DILATIONS),
        )
        self.output_conv = None if num_classes is None else nn.Conv2d(c128, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.initial_block(x))
        return x if self.output_conv is None else self.output_conv(x)


class ERFNetDecoder(nn.Module):
    """``layers.0`` .. ``layers.5`` (upsampler, 2 x non-bt-1D, upsampler, 2 x non-bt-1D) and the
    2x2 transposed convolution to the classes, ``output_conv``."""

    def __init__(self, channels: tuple[int, int, int], num_classes: int):
        super().__init__()
        c16, c64, c128 = channels
        self.layers = nn.Sequential(
            UpsamplerBlock(c128, c64),
            NonBottleneck1d(c64),
            NonBottleneck1d(c64),
            UpsamplerBlock(c64, c16),
            NonBottleneck1d(c16),
            NonBottleneck1d(c16),
        )
        self.output_conv = nn.ConvTranspose2d(c16, num_classes, 2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.output_conv(self.layers(x))


class ERFNet(nn.Module):
    """ERFNet, the paper's segmentation network (about 2.06 M parameters for 19 classes).

    Input: normalised RGB (N, 3, H, W), H and W multiples of 8. Output: logits (N, classes, H, W),
    or (N, classes, H/8, W/8) for the encoder-only model (upsample them to the label size).

    Encoder: downsampler 3->16, downsampler 16->64, 5 x non-bottleneck-1D(64), downsampler
    64->128, 2 x [non-bt-1D(128) with dilation 2, 4, 8, 16]; then either a 1x1 classifier
    (``encoder_only``: exactly 17 sequential layers) or the decoder: upsampler 128->64,
    2 x non-bt-1D(64), upsampler 64->16, 2 x non-bt-1D(16), 2x2 transposed conv to the classes.

    The paper's layer k of 17, as module names (every one returns one tensor, so any is a tap):

    ======  ==================================================  =============================
    k       module                                              what
    ======  ==================================================  =============================
    1       ``encoder.initial_block``                           downsampler 3->16, 1/2
    2       ``encoder.layers.0``                                downsampler 16->64, 1/4
    3-7     ``encoder.layers.1`` .. ``encoder.layers.5``        non-bt-1D(64)
    8       ``encoder.layers.6``                                downsampler 64->128, 1/8
    9-16    ``encoder.layers.7`` .. ``encoder.layers.14``       non-bt-1D(128), dil. 2-16 x 2
    17      ``encoder.output_conv``                             1x1 classifier, encoder-only
    17      ``decoder.output_conv``                             full model's classifier, 1/1
    ======  ==================================================  =============================

    The full model's decoder blocks are ``decoder.layers.0`` .. ``decoder.layers.5``. The paper
    matches layers 4, 8, 12 and 17: ``paper_taps(encoder_only)`` gives them, weight 1.0 each.
    Gaussian matching folds into the convolutions and BatchNorms inside the blocks
    (``foldable_layers``).

    Args:
        num_classes: number of output classes.
        encoder_only: the 17-layer encoder with a 1x1 classifier, output at 1/8 resolution.
        width: multiplies every channel count (16, 64, 128), e.g. 0.25 for a fast CPU demo.
        dropout: the dropout probability of every encoder non-bt-1D block; ``None`` keeps the
            original's 0.03 (64-channel blocks) and 0.3 (128-channel blocks), 0 turns it off.
            The decoder has none, as in the original.
        weights: a local file: a state dict of this network, or a Lightning checkpoint whose
            ``state_dict`` holds it under ``net.`` (SourceModule) or ``target_net.`` (GAM); or
            one of the authors' files (Eromera/erfnet_pytorch, ``translate_weights``): the
            released ``erfnet_pretrained.pth`` (``module.`` keys, 20 classes), a training
            checkpoint (``{'epoch', 'state_dict', 'optimizer'}``), a plain state dict of their
            network, or the ImageNet-pretrained encoder (``erfnet_encoder_pretrained.pth.tar``,
            ``module.features.encoder.*``: the encoder only, the decoder starts initialised).
        skip_mismatched_classifier: load everything but a classifier of another class count
            (e.g. the authors' 20 classes, 19 + void, into 19): it starts initialised, and the
            log says so. Off, such a file is an error that names this option.
        example_input_shape: one input's (C, H, W), for sizing discriminators with a dry forward.
        channels_last: keep the convolution weights and the activations in the channels-last
            memory format (NHWC), which cuDNN's fastest convolutions (tensor cores under
            bf16/fp16) read directly; the same outputs within float rounding.

    Example:
        >>> net = ERFNet(19, width=0.25)
        >>> net(torch.zeros(1, 3, 32, 64)).shape
        torch.Size([1, 19, 32, 64])
        >>> ERFNet(19, encoder_only=True, width=0.25)(torch.zeros(1, 3, 32, 64)).shape
        torch.Size([1, 19, 4, 8])
        >>> ERFNet.paper_taps(encoder_only=True)
        {'encoder.layers.2': 1.0, 'encoder.layers.6': 1.0, 'encoder.layers.10': 1.0, 'encoder.output_conv': 1.0}
    """  # noqa: E501

    PAPER_LAYERS = {4: "encoder.layers.2", 8: "encoder.layers.6", 12: "encoder.layers.10"}
    """The paper's matched layers 4, 8 and 12 of 17 (layer 17 is the classifier)."""

    def __init__(
        self,
        num_classes: int,
        encoder_only: bool = False,
        width: float = 1.0,
        dropout: float | None = None,
        weights: str | None = None,
        example_input_shape: Sequence[int] = (3, 512, 1024),
        skip_mismatched_classifier: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
        channels = _scaled_channels(width)
        self.encoder_only = encoder_only
        self.encoder = ERFNetEncoder(
            channels, _encoder_dropout(dropout), num_classes if encoder_only else None
        )
        self.decoder = None if encoder_only else ERFNetDecoder(channels, num_classes)
        self.example_input_shape = tuple(example_input_shape)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if weights is not None:
            load_weights(self, weights, skip_mismatched_classifier)

    @staticmethod
    def paper_taps(encoder_only: bool = False) -> dict[str, float]:
        """``{layer name: weight}`` of the paper's matched layers 4, 8, 12 and 17, weight 1.0
        each; layer 17 is ``encoder.output_conv`` (encoder-only) or ``decoder.output_conv``."""
        classifier = "encoder.output_conv" if encoder_only else "decoder.output_conv"
        return {name: 1.0 for name in [*ERFNet.PAPER_LAYERS.values(), classifier]}

    def classifier_layers(self) -> tuple[str, ...]:
        """The layer whose outputs are the classes: ``decoder.output_conv`` (full model) or
        ``encoder.output_conv`` (encoder-only)."""
        return ("encoder.output_conv",) if self.decoder is None else ("decoder.output_conv",)

    def translate_weights(self, state: dict[str, Tensor]) -> Translated:
        """The authors' layouts (Eromera/erfnet_pytorch) in this network's: their ``Net`` has
        the same keys (``module.`` is removed before), but always carries both the encoder's
        1x1 classifier ``encoder.output_conv`` and the decoder; the one this network does not
        have is dropped. Their ImageNet encoder (``features.encoder.*``, with ``classifier.*``
        for ImageNet's classes) loads into the encoder only; the decoder and the classifier
        start initialised. Each drop is a note (``dam_lightning.weights.load_state`` logs it).

        Example:
            >>> net = ERFNet(19, width=0.25)
            >>> imagenet = {f"features.{k}": v for k, v in net.state_dict().items()
            ...             if k.startswith("encoder.")}
            >>> translated = net.translate_weights({**imagenet, "classifier.linear.bias": 0})
            >>> sorted(translated.state) == sorted(k[9:] for k in imagenet)
            True
            >>> translated.initialised
            ('decoder.', 'encoder.output_conv.')
        """
        notes: list[str] = []
        initialised: tuple[str, ...] = ()
        imagenet = "features.encoder."
        if any(k.startswith(imagenet) for k in state):
            dropped = sorted({k.rsplit(".", 1)[0] for k in state if k.startswith("classifier.")})
            state = {
                ("encoder." + k[len(imagenet) :] if k.startswith(imagenet) else k): v
                for k, v in state.items()
                if not k.startswith("classifier.")
            }
            initialised = ("decoder.", "encoder.output_conv.")
            notes.append(
                "the ImageNet-pretrained encoder (features.encoder.*) loaded into the encoder "
                "only; the decoder and the classifier start initialised"
                + (f" (ImageNet's {', '.join(dropped)} dropped)" if dropped else "")
            )
        unused = ("encoder.output_conv.",) if self.decoder is not None else ("decoder.",)
        if not initialised and any(k.startswith(unused) for k in state):
            state = {k: v for k, v in state.items() if not k.startswith(unused)}
            notes.append(
                "dropped encoder.output_conv.* (the encoder-only classifier, unused when the "
                "decoder is present)" if self.decoder is not None else
                "dropped decoder.* (unused by the encoder-only network, which classifies with "
                "encoder.output_conv)"
            )  # fmt: skip
        elif initialised:
            state = {k: v for k, v in state.items() if not k.startswith(initialised)}
        return Translated(state, initialised, tuple(notes))

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.encoder(x)
        return x if self.decoder is None else self.decoder(x)


def _scaled_channels(width: float) -> tuple[int, int, int]:
    channels = tuple(max(1, round(c * width)) for c in (16, 64, 128))
    if width <= 0 or channels[0] <= 3:
        raise ConfigError(
            f"width={width} gives ERFNet channels {channels}; the first downsampler needs more "
            "than 3 (its conv supplies 16*width - 3 of them): use width >= 0.25"
        )
    return channels


def _encoder_dropout(dropout: float | None) -> tuple[float, float]:
    if dropout is None:
        return ENCODER_DROPOUT
    if not 0 <= dropout < 1:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}; None keeps 0.03 / 0.3")
    return dropout, dropout


def _check_input(x: Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] % OUTPUT_STRIDE or x.shape[3] % OUTPUT_STRIDE:
        raise ConfigError(
            f"ERFNet takes normalised RGB images (N, 3, H, W) with H and W multiples of "
            f"{OUTPUT_STRIDE}, got shape {tuple(x.shape)}; crop, pad or resize them "
            "(e.g. to 512x1024)"
        )


def load_weights(
    net: nn.Module, path: str | os.PathLike, skip_mismatched_classifier: bool = False
) -> None:
    """Load ``net``'s weights from a local state dict or a SourceModule/GAM checkpoint (or the
    authors' files, see ``ERFNet``), read as weights only (``dam_lightning.weights``: a file
    holding other Python objects is refused, not run). Raises naming ``weights`` and the file
    when it is missing or does not fit.

    Example:
        >>> import tempfile
        >>> net = ERFNet(4, encoder_only=True, width=0.25)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     torch.save(net.state_dict(), f"{folder}/erfnet.pt")
        ...     load_weights(ERFNet(4, encoder_only=True, width=0.25), f"{folder}/erfnet.pt")
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFileError(
            f"weights: {path} does not exist; pass the path of a local state dict or "
            f"checkpoint of {type(net).__name__} (e.g. the authors' erfnet_pretrained.pth), "
            "or weights: null"
        )
    load_network_weights(
        net, path, setting="weights", skip_mismatched_classifier=skip_mismatched_classifier
    )
