"""The result of a diagnosis and its outputs: the per-layer table (Markdown), the JSON and the two
figures, written atomically into one folder.

It formats and writes what ``engine.diagnose`` measured; it measures nothing itself.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass, field

from torch import Tensor

from dam_lightning.runs import atomic_write_bytes, atomic_write_text

FILES = ("diagnose.md", "diagnose.json", "gap_by_layer.png", "histograms.png")
"""What ``Diagnosis.save`` writes, in that order."""

PURPOSE = (
    "The gaps show where Gaussian matching left a domain gap for the adversarial stage to close "
    "(A-dist: 2 = separable, 0 = indistinguishable). They do not pick the layers to match: keep "
    "the config's (the paper's); docs/configuration.md, \"Before adapting: `diagnose`\"."
)
"""The line that ends the printed report and ``diagnose.md``: what the gaps are for, and not."""


@dataclass(frozen=True)
class LayerDiagnosis:
    """One layer's figures. "before": F_s on source vs F_s on target; "after": F_s on source vs
    F_t on target, F_t being F_s after Gaussian matching on the target calibration batches.

    Attributes:
        depth: 1-based position in the order the layers run.
        name: the layer's dotted module name (``"output"``: the network's output).
        kind: the module's class name.
        channels: number of channels (dim 1 of its output).
        matched: whether Gaussian matching corrected this layer's own output.
        mean_gap_*: mean over channels of |mu_t - mu_s| / pooled std.
        std_gap_*: mean over channels of |log(sigma_t / sigma_s)|.
        accuracy_*: held-out balanced accuracy of a logistic-regression domain classifier on
            the channel-pooled activations (0.5 = chance).
        a_distance_*: proxy A-distance 2 (1 - 2 (1 - accuracy)).
    """

    depth: int
    name: str
    kind: str
    channels: int
    matched: bool
    mean_gap_before: float
    std_gap_before: float
    accuracy_before: float
    a_distance_before: float
    mean_gap_after: float
    std_gap_after: float
    accuracy_after: float
    a_distance_after: float


@dataclass(frozen=True, eq=False)
class ChannelHistogram:
    """Sampled values of one channel, for the Fig. 3 histograms: F_s on source, F_s on target,
    F_t (Gaussian-matched) on target. ``gap`` is the channel's mean gap + std gap before."""

    layer: str
    channel: int
    gap: float
    source: Tensor
    target: Tensor
    matched: Tensor


@dataclass
class Diagnosis:
    """What ``diagnose`` found, with its outputs.

    Attributes:
        layers: one ``LayerDiagnosis`` per diagnosed layer, in depth order.
        output_layer: the layer whose output is the network's output.
        histograms: the channels with the largest gap at a few layers, with sampled values.
        settings: what it ran with (network, images per domain, holdout, seed, matching),
            written into the JSON.
    """

    layers: list[LayerDiagnosis]
    output_layer: str
    histograms: list[ChannelHistogram] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def layer(self, name: str) -> LayerDiagnosis:
        """The row of layer ``name``."""
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no diagnosed layer {name!r}; diagnosed: {[r.name for r in self.layers]}")

    def to_dict(self) -> dict:
        """Everything but the sampled values, as JSON-ready types (NaN/inf become ``None``)."""
        return _finite(
            {
                "settings": self.settings,
                "output_layer": self.output_layer,
                "layers": [dataclasses.asdict(row) for row in self.layers],
                "histograms": [
                    {"layer": h.layer, "channel": h.channel, "gap": h.gap} for h in self.histograms
                ],
            }
        )

    def to_json(self) -> str:
        """``to_dict`` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def table(self) -> str:
        """The per-layer Markdown table."""
        header = (
            "| depth | layer | type | channels | mean gap | std gap | D acc | A-dist "
            "| mean gap GM | std gap GM | D acc GM | A-dist GM |"
        )
        lines = [header, "|" + "---|" * 12]
        for row in self.layers:
            lines.append(
                f"| {row.depth} | {row.name}{'' if row.matched else ' (not matched)'} | {row.kind} "
                f"| {row.channels} | {row.mean_gap_before:.3f} | {row.std_gap_before:.3f} "
                f"| {row.accuracy_before:.3f} | {row.a_distance_before:.3f} "
                f"| {row.mean_gap_after:.3f} | {row.std_gap_after:.3f} "
                f"| {row.accuracy_after:.3f} | {row.a_distance_after:.3f} |"
            )
        return "\n".join(lines)

    def report(self) -> str:
        """The table and what its gaps are for (``PURPOSE``), as printed by ``diagnose``."""
        return f"{self.table()}\n\n{PURPOSE}\n"

    def to_markdown(self) -> str:
        """The contents of ``diagnose.md``."""
        s = self.settings
        return "\n".join(
            [
                f"# Domain gap of {s.get('network', 'the source network')}, layer by layer",
                "",
                f"F_s on {s.get('source_images', '?')} source vs "
                f"{s.get('target_images', '?')} target calibration images. Gaps, over all of "
                "them: mean over channels of |mu_t - mu_s| / pooled std, and of "
                "|log(sigma_t / sigma_s)|. D acc: balanced accuracy of a logistic regression "
                f"({s.get('probe', '?')} probe) telling source from target on channel-pooled "
                f"activations, scored on the {s.get('holdout', '?')} of each domain's images "
                "it was not trained on; A-dist = 2 (1 - 2 err). GM: after Gaussian matching of "
                "a copy of F_s fitted to the training part of the images (the held-out part "
                "stays unseen), i.e. what the adversarial stage is left to close. (not matched): "
                "a layer Gaussian matching does not correct itself.",
                "",
                self.table(),
                "",
                PURPOSE,
                "",
                "Figures: `gap_by_layer.png` (gaps and A-distance against depth, before and after "
                "Gaussian matching), `histograms.png` (the channels with the largest gap: source, "
                "target, target after Gaussian matching).",
                "",
            ]
        )

    def figures(self) -> dict:
        """``{"gap_by_layer": Figure, "histograms": Figure}`` (matplotlib), e.g. for a logger."""
        from dam_lightning.diagnosis.figures import plot_gap_by_layer, plot_histograms

        return {"gap_by_layer": plot_gap_by_layer(self), "histograms": plot_histograms(self)}

    def save(self, folder: str | os.PathLike) -> dict[str, str]:
        """Write ``FILES`` into ``folder`` (created if needed), each atomically (a temporary
        file, then a rename); returns ``{file name: path}``."""
        folder = os.fspath(folder)
        paths = {name: os.path.join(folder, name) for name in FILES}
        atomic_write_text(paths["diagnose.md"], self.to_markdown())
        atomic_write_text(paths["diagnose.json"], self.to_json())
        for name, figure in self.figures().items():
            atomic_write_bytes(paths[f"{name}.png"], _png(figure))
        return paths


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _finite(value):
    """``value`` with every non-finite float replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
