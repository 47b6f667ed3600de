"""``diagnose``: the domain gap of a source network at every candidate layer, before and after
Gaussian matching, from calibration batches of both domains.

Four passes over the calibration data, each with hooks on every layer at once: F_s on source,
F_s on target, Gaussian matching of a copy F_t (``gaussian_match``, about one pass), F_t on
target. The given network is never changed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dam_lightning.diagnosis.activations import (
    LayerRecording,
    channel_gaps,
    device_of,
    execution_order,
    record_activations,
    within_process,
)
from dam_lightning.diagnosis.discriminability import discriminability, holdout_split
from dam_lightning.diagnosis.result import ChannelHistogram, Diagnosis, LayerDiagnosis
from dam_lightning.errors import ConfigError
from dam_lightning.matching.gaussian import foldable_layers, gaussian_match
from dam_lightning.matching.statistics import mean_gap, std_gap
from dam_lightning.matching.taps import OUTPUT, resolve_layer


def diagnose(
    source_net: nn.Module,
    source_batches: Sequence[Tensor],
    target_batches: Sequence[Tensor],
    layers: Sequence[str] | None = None,
    *,
    match_layers: Sequence[str] | None = None,
    batchnorm: Literal["fold", "adabn"] = "fold",
    mode: Literal["one_pass", "layerwise"] = "one_pass",
    holdout: float = 0.5,
    histogram_layers: int | Sequence[str] = 4,
    histogram_channels: int = 3,
    histogram_values: int = 2000,
    probe: Literal["kernel", "linear"] = "kernel",
    seed: int = 0,
    progress: bool | None = None,
) -> Diagnosis:
    """Measure, at every candidate layer of ``source_net`` (F_s), how far its activations on
    ``target_batches`` are from those on ``source_batches``, before and after Gaussian matching.

    Per layer: the Gaussian gap (mean gap in pooled-std units, std log-ratio: the statistics of
    ``dam_lightning.matching.statistics``) over all calibration images, and a discriminability
    score (``discriminability``: logistic regression on channel-pooled activations, trained on
    part of each domain's images and scored on the ``holdout`` fraction: balanced accuracy and
    proxy A-distance). "After": the same between F_s on source and F_t on target, F_t being a
    copy of F_s that ``gaussian_match`` corrected with the training part of each domain's
    images (so the held-out images stay unseen by every fitted step): what the adversarial stage
    is left to close. At a matched layer the gaps after matching are then 0 on the training part
    and sampling noise on the held-out part. The figures show where a domain gap is left; they
    do not choose GAM's layers (docs/configuration.md, "Before adapting: `diagnose`").

    Args:
        source_net: the trained source network; only read (its modes are restored).
        source_batches, target_batches: input tensors (CPU or device); each is moved to the
            network's device when used.
        layers: dotted names of the layers to diagnose (``"output"``: the network's output).
            Default: ``foldable_layers(source_net)`` (every Conv/Linear with a bias and every
            BatchNorm), plus ``"output"`` when none of them produces the network's output.
        match_layers: the layers Gaussian matching corrects; default ``foldable_layers``, as
            the ``GaussianMatching`` callback does.
        batchnorm, mode: passed to ``gaussian_match``.
        holdout: fraction of each domain's calibration images the classifier is scored on.
        histogram_layers: the layers of ``histograms.png``: their names, or how many, spread
            evenly over depth (the first and the last included).
        histogram_channels: channels per histogram layer: those with the largest mean gap +
            std gap.
        histogram_values: values kept per channel of a histogram layer (random positions), so
            memory does not grow with the image size.
        probe: the domain classifier, ``discriminability``'s: ``"kernel"`` (logistic regression
            on an RBF kernel map of the pooled features) or ``"linear"`` (on the features:
            blind after matching at matched layers, where the features' means are equal).
        seed: seeds the held-out split and the sampled positions.
        progress: show a progress bar; ``None`` shows it only on a terminal.

    The output layer is the diagnosed layer whose output is the network's output (else the
    deepest one). Layers must run once per forward pass and return one tensor with channels in
    dim 1.

    Example:
        >>> from dam_lightning.models import LeNet
        >>> _ = torch.manual_seed(0)
        >>> source = [torch.rand(16, 1, 28, 28) for _ in range(2)]
        >>> target = [0.5 * x + 0.5 for x in source]
        >>> diagnosis = diagnose(LeNet(), source, target, progress=False)
        >>> [row.name for row in diagnosis.layers], diagnosis.output_layer
        (['conv1.0', 'conv2.0', 'fc3.1', 'fc4'], 'fc4')
        >>> diagnosis.layer("conv1.0").a_distance_before, round(diagnosis.layer("fc4").mean_gap_after, 4)
        (2.0, 0.0)
    """  # noqa: E501
    _check_options(holdout, histogram_channels, histogram_values)
    source_batches, target_batches = _checked_batches(source_batches, target_batches)
    for batches in (source_batches, target_batches):  # refuse too few images before any pass
        holdout_split(sum(len(x) for x in batches), holdout, seed)
    device = device_of(source_net)
    candidates = _unique(list(layers) if layers is not None else foldable_layers(source_net))
    example = source_batches[0][:1].to(device)
    order, output_layer = execution_order(source_net, candidates, example)
    if not output_layer:
        if layers is None:
            order.append(OUTPUT)
            output_layer = OUTPUT
        else:
            output_layer = order[-1]
    matched = _unique(
        list(match_layers) if match_layers is not None else foldable_layers(source_net)
    )
    sampled = _histogram_layers(histogram_layers, order)

    passes = len(source_batches) + 2 * len(target_batches)
    bar = tqdm(total=passes + 1 + 2 * len(order), desc="diagnose", unit="step",
               disable=None if progress is None else not progress, leave=False)  # fmt: skip
    try:
        source, target, after = _record_passes(
            source_net, source_batches, target_batches, order, matched, sampled, bar,
            holdout=holdout, seed=seed, histogram_values=histogram_values,
            batchnorm=batchnorm, mode=mode,
        )  # fmt: skip
        bar.set_postfix_str("domain classifiers")
        rows = []
        for depth, name in enumerate(order, start=1):
            scores = []
            for recording in (target, after):
                features = recording[name].features
                scores.append(
                    discriminability(source[name].features, features, holdout, seed, probe)
                )
                bar.update()
            rows.append(
                LayerDiagnosis(
                    depth=depth,
                    name=name,
                    kind=type(resolve_layer(source_net, name)).__name__,
                    channels=source[name].stats.mean.numel(),
                    matched=name in matched,
                    mean_gap_before=mean_gap(target[name].stats, source[name].stats),
                    std_gap_before=std_gap(target[name].stats, source[name].stats),
                    accuracy_before=scores[0].accuracy,
                    a_distance_before=scores[0].a_distance,
                    mean_gap_after=mean_gap(after[name].stats, source[name].stats),
                    std_gap_after=std_gap(after[name].stats, source[name].stats),
                    accuracy_after=scores[1].accuracy,
                    a_distance_after=scores[1].a_distance,
                )
            )
    finally:
        bar.close()

    settings = {
        "network": type(source_net).__name__,
        "source_images": sum(len(x) for x in source_batches),
        "target_images": sum(len(x) for x in target_batches),
        "holdout": holdout,
        "probe": probe,
        "seed": seed,
        "batchnorm": batchnorm,
        "matched_layers": matched,
        "histogram_values": histogram_values,
    }
    return Diagnosis(
        layers=rows,
        output_layer=output_layer,
        histograms=_largest_gaps(sampled, histogram_channels, source, target, after),
        settings=settings,
    )


def diagnose_datamodule(
    source_net: nn.Module,
    datamodule,
    calibration_batches: int = 10,
    **options,
) -> Diagnosis:
    """``diagnose`` on ``calibration_batches`` batches per domain of a
    ``DomainAdaptationDataModule`` (``calibration_batches(domain, n)``: a fixed subset chosen by
    the data's ``seed``, evaluation transforms); ``options`` go to ``diagnose``.

    Example:
        >>> from dam_lightning.data import DomainAdaptationDataModule, SynDigits
        >>> from dam_lightning.models import LeNet
        >>> data = DomainAdaptationDataModule(SynDigits(40, seed=0), SynDigits(40, seed=1),
        ...                                   batch_size=10)
        >>> diagnosis = diagnose_datamodule(LeNet(), data, calibration_batches=2, progress=False)
        >>> diagnosis.settings["source_images"], diagnosis.settings["calibration_batches"]
        (20, 2)
    """
    if calibration_batches < 1:
        raise ConfigError(f"calibration_batches must be >= 1, got {calibration_batches}")
    source = datamodule.calibration_batches("source", calibration_batches)
    target = datamodule.calibration_batches("target", calibration_batches)
    diagnosis = diagnose(source_net, source, target, **options)
    diagnosis.settings["calibration_batches"] = calibration_batches
    return diagnosis


def _record_passes(
    source_net, source_batches, target_batches, order, matched, sampled, bar, *, holdout, seed,
    histogram_values, batchnorm, mode,
):  # fmt: skip
    """The passes: F_s on source, F_s on target, Gaussian matching of a copy F_t, F_t on
    target; returns the three recordings. Gaussian matching is fitted to the training part of
    the held-out split only (source statistics and target batches), like the domain classifier:
    matched on every image, the held-out images' features would be tied to the training ones
    (their means add up to the source's), which biases a held-out score below chance."""
    record = dict(
        pooled=order, sampled=sampled, values_per_channel=histogram_values, seed=seed,
        on_batch=lambda: bar.update(),
    )  # fmt: skip
    source_fit = _fit_masks(source_batches, holdout, seed)
    target_fit = _fit_masks(target_batches, holdout, seed)
    bar.set_postfix_str("F_s on source")
    source = record_activations(
        source_net, source_batches, order, fit_layers=matched, fit_masks=source_fit, **record
    )
    bar.set_postfix_str("F_s on target")
    target = record_activations(source_net, target_batches, order, **record)
    bar.set_postfix_str("Gaussian matching")
    target_net = copy.deepcopy(source_net)
    fit_batches = [
        x[mask.to(x.device)]
        for x, mask in zip(target_batches, target_fit, strict=True)
        if mask.any()
    ]
    gaussian_match(
        source_net,
        target_net,
        source_batches=[],
        target_batches=_OnDevice(fit_batches, device_of(source_net)),
        layers=matched,
        batchnorm=batchnorm,
        mode=mode,
        source_stats={name: source[name].fit_stats for name in matched},
        reduce=within_process,
    )
    bar.update()
    bar.set_postfix_str("F_t on target")
    after = record_activations(target_net, target_batches, order, **record)
    return source, target, after


def _fit_masks(batches: list[Tensor], holdout: float, seed: int) -> list[Tensor]:
    """One boolean mask per batch: the images in the training part of ``holdout_split``."""
    train, _ = holdout_split(sum(len(x) for x in batches), holdout, seed)
    fit = torch.zeros(sum(len(x) for x in batches), dtype=torch.bool)
    fit[train] = True
    return list(fit.split([len(x) for x in batches]))


class _OnDevice(Sequence):
    """CPU batches moved to ``device`` one at a time, when read."""

    def __init__(self, batches: list[Tensor], device: torch.device):
        self.batches, self.device = batches, device

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index):
        return self.batches[index].to(self.device)


def _check_options(holdout, histogram_channels, histogram_values) -> None:
    if not 0 < holdout < 1:
        raise ConfigError(f"holdout must be a fraction in (0, 1), got {holdout}")
    for name, value, least in (
        ("histogram_channels", histogram_channels, 0),
        ("histogram_values", histogram_values, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")


def _checked_batches(source, target) -> tuple[list[Tensor], list[Tensor]]:
    batches = {"source": list(source), "target": list(target)}
    for domain, items in batches.items():
        if not items or not all(isinstance(x, Tensor) and len(x) for x in items):
            raise ConfigError(
                f"diagnose needs non-empty input tensors as {domain} calibration batches, got "
                f"{[type(x).__name__ for x in items] or 'none'}"
            )
    return batches["source"], batches["target"]


def _unique(names: list[str]) -> list[str]:
    if len(set(names)) != len(names):
        raise ConfigError(f"layer names must be unique, got {names}")
    return names


def _histogram_layers(choice: int | Sequence[str], order: list[str]) -> list[str]:
    """The named layers, or ``choice`` layers spread evenly over depth (first and last too)."""
    if isinstance(choice, int):
        if choice < 0:
            raise ConfigError(f"histogram_layers must be >= 0, got {choice}")
        count = min(choice, len(order))
        if count == 1:
            return [order[-1]]
        return list(dict.fromkeys(order[round(i * (len(order) - 1) / (count - 1))]
                                  for i in range(count)))  # fmt: skip
    unknown = [name for name in choice if name not in order]
    if unknown:
        raise ConfigError(
            f"histogram_layers {unknown} are not among the diagnosed layers {order}; name "
            "diagnosed layers, or give a number of layers"
        )
    return [name for name in order if name in choice]


def _largest_gaps(
    layers: list[str],
    channels: int,
    source: dict[str, LayerRecording],
    target: dict[str, LayerRecording],
    after: dict[str, LayerRecording],
) -> list[ChannelHistogram]:
    histograms = []
    for name in layers:
        gaps = channel_gaps(target[name].stats, source[name].stats)
        top = torch.argsort(gaps, descending=True, stable=True)[:channels].tolist()
        histograms += [
            ChannelHistogram(
                layer=name,
                channel=k,
                gap=float(gaps[k]),
                source=source[name].samples[k],
                target=target[name].samples[k],
                matched=after[name].samples[k],
            )
            for k in top
        ]
    return histograms
