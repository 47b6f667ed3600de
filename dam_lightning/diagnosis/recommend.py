"""Which layers GAM should match, and with what weights, from a diagnosis: a fixed, documented
rule over the A-distances left after Gaussian matching (``RULE``).

It reads figures only; whether the rule helps is measured elsewhere (docs/results/).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dam_lightning.errors import ConfigError

RULE = """\
1. The output layer is always matched, with weight 1.0: it is ADDA's layer, and every GAM
   configuration of the paper includes it.
2. The other layers are cut, in depth order, into `bands` contiguous groups of nearly equal
   size. In each group the layer with the highest A-distance after Gaussian matching (what the
   adversarial stage is left to close) is chosen, if that A-distance is at least
   `min_a_distance`: below it a discriminator finds almost nothing to close there, and the
   layer would only cost compute.
3. A chosen layer's weight is its A-distance after matching divided by the highest one among the
   chosen layers (the output's included), rounded to 2 decimals and at least 0.1."""


def recommend_layers(
    a_distance_after: Mapping[str, float],
    depth_order: Sequence[str],
    output_layer: str,
    bands: int = 3,
    min_a_distance: float = 0.2,
) -> dict[str, float]:
    """``{layer: weight}`` in depth order, by ``RULE``, from each layer's A-distance after
    Gaussian matching.

    Example:
        >>> a = {"conv1": 0.9, "conv2": 0.4, "conv3": 1.2, "fc": 0.1, "logits": 0.6}
        >>> recommend_layers(a, list(a), "logits", bands=2)
        {'conv1': 0.75, 'conv3': 1.0, 'logits': 1.0}
    """
    if bands < 0:
        raise ConfigError(f"bands must be >= 0, got {bands}")
    if output_layer not in a_distance_after:
        raise ConfigError(f"the output layer {output_layer!r} has no A-distance in the diagnosis")
    others = [name for name in depth_order if name != output_layer]
    chosen = []
    for band in _bands(others, bands):
        best = max(band, key=lambda name: a_distance_after[name])  # the first of equals
        if a_distance_after[best] >= min_a_distance:
            chosen.append(best)
    reference = max(a_distance_after[name] for name in [*chosen, output_layer])
    weights = {
        name: max(0.1, round(a_distance_after[name] / reference, 2)) if reference > 0 else 1.0
        for name in chosen
    }
    weights[output_layer] = 1.0
    return {name: weights[name] for name in depth_order if name in weights}


def _bands(names: list[str], bands: int) -> list[list[str]]:
    """``names`` cut into ``min(bands, len(names))`` contiguous groups whose sizes differ by at
    most one (the earlier groups take the extra names)."""
    count = min(bands, len(names))
    size, extra = divmod(len(names), count) if count else (0, 0)
    groups, start = [], 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        groups.append(names[start:end])
        start = end
    return groups
