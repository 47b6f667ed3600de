"""The two pictures of a diagnosis: gaps and A-distance by layer (``gap_by_layer.png``) and
the paper's Fig. 3, overlaid histograms of the channels with the largest gap (``histograms.png``).

matplotlib's object API only (no pyplot): no global figure state, no display backend needed.
"""

from __future__ import annotations

import math

import torch
from matplotlib.figure import Figure

COLOURS = {"source": "tab:blue", "target": "tab:red", "target, Gaussian-matched": "tab:green"}
NAMED_TICKS = 40  # up to this many layers the x axis names each, beyond it one in k


def plot_gap_by_layer(diagnosis) -> Figure:
    """Mean gap, std gap and A-distance against depth, before (solid) and after (dashed)
    Gaussian matching; layers named on the x axis (``_name_layers``)."""
    rows = diagnosis.layers
    depth = [row.depth for row in rows]
    figure = Figure(figsize=(max(6.0, min(16.0, 0.25 * len(rows) + 4)), 6.5), layout="constrained")
    gap_axes, distance_axes = figure.subplots(2, 1, sharex=True)
    for gap, colour in (("mean_gap", "tab:purple"), ("std_gap", "tab:orange")):
        for when, style in (("before", "-"), ("after", "--")):
            values = [getattr(row, f"{gap}_{when}") for row in rows]
            suffix = " after Gaussian matching" if when == "after" else ""
            label = f"{gap.replace('_', ' ')}{suffix}"
            gap_axes.plot(depth, values, style, marker="o", ms=3, color=colour, label=label)
    gap_axes.set_ylabel("gap (pooled std / |log std ratio|)")
    gap_axes.legend(fontsize="small")
    gap_axes.set_title(f"Domain gap by layer: {diagnosis.settings.get('network', '')}")
    for when, style in (("before", "-"), ("after", "--")):
        values = [getattr(row, f"a_distance_{when}") for row in rows]
        suffix = " after Gaussian matching" if when == "after" else ""
        distance_axes.plot(depth, values, style, marker="o", ms=3, color="tab:blue",
                           label=f"A-distance{suffix}")  # fmt: skip
    distance_axes.axhline(0, color="grey", lw=0.5)
    distance_axes.set_ylim(min(-0.1, *(row.a_distance_after for row in rows)) - 0.05, 2.05)
    distance_axes.set_ylabel("proxy A-distance")
    distance_axes.legend(fontsize="small")
    _name_layers(distance_axes, rows)
    return figure


def _name_layers(axes, rows) -> None:
    """Layer names on the x axis at their depths: all of them up to ``NAMED_TICKS`` layers,
    beyond that one in k so that ERFNet's 113 stay legible, upright when many; the axis label
    says which are shown."""
    step = max(1, math.ceil(len(rows) / NAMED_TICKS))
    named = rows[::step]
    upright = len(named) > 12
    axes.set_xticks([row.depth for row in named], [row.name for row in named],
                    rotation=90 if upright else 45, ha="center" if upright else "right",
                    fontsize="x-small" if upright else "small")  # fmt: skip
    if step == 1:
        axes.set_xlabel("layer")
    else:
        axes.set_xlabel(f"layer (one in {step} named; all: diagnose.md)")


def plot_histograms(diagnosis) -> Figure:
    """One panel per (layer, channel) of ``diagnosis.histograms``, one row per layer: source,
    target and Gaussian-matched target values overlaid as density histograms."""
    layers = list(dict.fromkeys(h.layer for h in diagnosis.histograms))
    columns = max([sum(h.layer == layer for h in diagnosis.histograms) for layer in layers] or [1])
    figure = Figure(figsize=(3.2 * columns, 2.4 * max(len(layers), 1) + 0.6), layout="constrained")
    axes = figure.subplots(max(len(layers), 1), columns, squeeze=False)
    for row, layer in enumerate(layers):
        panels = [h for h in diagnosis.histograms if h.layer == layer]
        for column in range(columns):
            ax = axes[row][column]
            if column >= len(panels):
                ax.set_axis_off()
                continue
            _overlay(ax, panels[column])
    if not layers:
        axes[0][0].set_axis_off()
        axes[0][0].text(0.5, 0.5, "no layer with histograms", ha="center")
    else:
        axes[0][0].legend(fontsize="x-small")
    figure.suptitle("Channels with the largest gap: F_s on source, F_s on target, "
                    "F_t (Gaussian-matched) on target")  # fmt: skip
    return figure


def _overlay(ax, histogram) -> None:
    series = {
        "source": histogram.source,
        "target": histogram.target,
        "target, Gaussian-matched": histogram.matched,
    }
    everything = torch.cat(list(series.values())).double()
    low, high = torch.quantile(everything, torch.tensor([0.005, 0.995]).double()).tolist()
    if high <= low:  # a constant channel: give its spike a visible width
        low, high = low - 0.5, high + 0.5
    # Source and target filled, the matched target as an outline on top: where matching
    # worked it traces the source's shape, which a third filled layer would hide.
    for label, values in series.items():
        filled = label != "target, Gaussian-matched"
        ax.hist(values.numpy(), bins=40, range=(low, high), density=True,
                histtype="stepfilled" if filled else "step", alpha=0.35 if filled else 1.0,
                linewidth=1.5, color=COLOURS[label], label=label)  # fmt: skip
    ax.set_title(f"{histogram.layer} / ch {histogram.channel} (gap {histogram.gap:.2f})",
                 fontsize="small")  # fmt: skip
    ax.tick_params(labelsize="x-small")
