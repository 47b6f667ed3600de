"""How well a small classifier tells source activations from target ones: logistic regression on
channel-pooled features (by default on an RBF kernel map of them), scored on held-out images, as
accuracy and proxy A-distance.

Plain scikit-learn on CPU tensors; it sees features, never a network.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Literal

import sklearn
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import ThreadpoolController
from torch import Tensor

from dam_lightning.errors import ConfigError


@dataclass(frozen=True)
class Discriminability:
    """Held-out score of a source-vs-target classifier.

    Attributes:
        accuracy: balanced accuracy (the mean of the per-domain accuracies), so that 0.5 is
            chance whatever the two domains' sizes.
        a_distance: proxy A-distance 2 (1 - 2 err) with err = 1 - accuracy: 0 for domains a
            linear classifier cannot tell apart (slightly negative from noise), 2 for separable.
    """

    accuracy: float
    a_distance: float

    @classmethod
    def from_accuracy(cls, accuracy: float) -> Discriminability:
        """The score of a classifier with this held-out ``accuracy``."""
        return cls(accuracy=accuracy, a_distance=2.0 * (1.0 - 2.0 * (1.0 - accuracy)))


def pool_channels(activation: Tensor) -> Tensor:
    """One feature vector per image: the mean over every position of each channel (dim 1), as
    (N, C) float32; an (N, C) activation is its own feature vector.

    Example:
        >>> pool_channels(torch.ones(2, 3, 4, 4)).shape, pool_channels(torch.ones(2, 5)).shape
        (torch.Size([2, 3]), torch.Size([2, 5]))
    """
    features = activation.detach().float()
    return features.flatten(2).mean(dim=2) if features.dim() > 2 else features


def holdout_split(count: int, holdout: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train, held-out) indices of ``count`` images: a permutation drawn from ``seed`` alone, so
    two domains of the same size are split at the same positions (the same images, when they
    are the same data: then the classifier scores exactly chance).

    Example:
        >>> train, test = holdout_split(10, 0.3, seed=0)
        >>> len(train), len(test), sorted(train.tolist() + test.tolist()) == list(range(10))
        (7, 3, True)
    """
    if not 0 < holdout < 1:
        raise ConfigError(f"holdout must be a fraction in (0, 1), got {holdout}")
    held_out = round(count * holdout)
    if held_out < 1 or held_out >= count:
        raise ConfigError(
            f"{count} calibration images cannot be split into a training and a held-out part "
            f"with holdout={holdout}: give at least 2 images per domain (more calibration "
            "batches)"
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[held_out:], order[:held_out]


PROBES = ("kernel", "linear")
KERNEL_COMPONENTS = 300  # Nystroem landmarks: at most this many, at most the training images


def discriminability(
    source_features: Tensor,
    target_features: Tensor,
    holdout: float = 0.5,
    seed: int = 0,
    probe: Literal["kernel", "linear"] = "kernel",
    regularization: float = 1.0,
) -> Discriminability:
    """Train logistic regression to tell ``source_features`` (N_s, C) from ``target_features``
    (N_t, C) on part of each domain's images (``holdout_split(N, holdout, seed)``'s training
    part) and score it on the ``holdout`` fraction it did not see.

    Features are standardised with the training part's mean and std. ``probe="kernel"`` fits
    the regression on an RBF kernel map of them (Nystroem, up to 300 landmarks, gamma =
    1 / C): a linear regression on the features themselves is blind to domains whose features
    have equal means, which is exactly what Gaussian matching makes of a matched layer (the
    mean of the pooled features is the channel mean), so after matching only a non-linear
    probe measures what is left. ``probe="linear"``: the regression on the features. The two
    domains are weighted equally (``class_weight="balanced"``); ``regularization`` is
    scikit-learn's ``C`` (inverse L2 strength).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> source = torch.randn(200, 4, generator=g)
        >>> discriminability(source, source).accuracy
        0.5
        >>> discriminability(source, source + 5).a_distance
        2.0
        >>> wider = 3 * torch.randn(200, 4, generator=g)  # same mean, other spread
        >>> discriminability(source, wider, probe="linear").accuracy < 0.65
        True
        >>> discriminability(source, wider).accuracy > 0.8
        True
    """
    if probe not in PROBES:
        raise ConfigError(f"unknown probe {probe!r}: use 'kernel' or 'linear'")
    _check_features(source_features, target_features)
    source_train, source_test = holdout_split(len(source_features), holdout, seed)
    target_train, target_test = holdout_split(len(target_features), holdout, seed)

    def stacked(source_index: Tensor, target_index: Tensor):
        x = torch.cat([source_features[source_index], target_features[target_index]])
        y = torch.cat([torch.zeros(len(source_index)), torch.ones(len(target_index))])
        return x.double().numpy(), y.long().numpy()

    steps = [StandardScaler()]
    if probe == "kernel":
        landmarks = min(KERNEL_COMPONENTS, len(source_train) + len(target_train))
        steps.append(Nystroem(n_components=landmarks, random_state=seed))
    classifier = make_pipeline(
        *steps, LogisticRegression(C=regularization, class_weight="balanced", max_iter=1000)
    )
    # One BLAS thread: the fits are small, and on a shared CPU the spin-waiting of BLAS's
    # threads made a diagnosis of ERFNet's 113 layers 7x slower (10.7 s against 1.5 s).
    # The inputs are finite float64 arrays built here: scikit-learn's per-call validation of
    # them and of the parameters cost more than a small layer's fit.
    with (
        warnings.catch_warnings(),
        _blas_threads().limit(limits=1, user_api="blas"),
        sklearn.config_context(assume_finite=True, skip_parameter_validation=True),
    ):
        # An unconverged fit is still a valid (weaker) classifier: the score stays a lower
        # bound of what a discriminator could do, so the warning would only be noise.
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(*stacked(source_train, target_train))
        x_test, _ = stacked(source_test, target_test)
        predicted = torch.from_numpy(classifier.predict(x_test))
    # Balanced accuracy: the mean of the two domains' accuracies.
    source_correct = (predicted[: len(source_test)] == 0).double().mean()
    target_correct = (predicted[len(source_test) :] == 1).double().mean()
    return Discriminability.from_accuracy(float((source_correct + target_correct) / 2))


@functools.cache
def _blas_threads() -> ThreadpoolController:
    """The process's BLAS libraries, found once (a lookup per fit would cost more than the fit
    of a small layer)."""
    return ThreadpoolController()


def _check_features(source: Tensor, target: Tensor) -> None:
    if source.dim() != 2 or target.dim() != 2 or source.shape[1] != target.shape[1]:
        raise ConfigError(
            f"source features {tuple(source.shape)} and target features {tuple(target.shape)} "
            "must be (N, C) with the same C: pool the activations with pool_channels first"
        )
