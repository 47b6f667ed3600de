"""What a user reads first: the top-level ``--help`` (what the library is, its three stages, its
commands and shipped configs, printed before torch and Lightning are imported), each command's
whole description, and the scores ``validate``/``test`` print in the summaries' unit."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from dam_lightning.cli import DamCLI, main
from dam_lightning.overview import SUBCOMMANDS, shipped_configs, top_level_help
from dam_lightning.run_end import metrics_table

from .conftest import REPO


def test_top_level_help_is_fast_and_says_what_the_library_is():
    code = (
        "import runpy, sys; sys.argv = ['x', '--help']; "
        "runpy.run_module('dam_lightning', run_name='__main__'); "
        "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'imported'"
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "Lightning Trainer command line tool" not in text
    commands = ",".join(SUBCOMMANDS)
    assert text.startswith(f"usage: python -m dam_lightning {{{commands}}} --config FILE")
    assert "deep activation matching (GAM)" in text
    for stage in ("1. source training", "2. Gaussian matching", "3. GAM"):
        assert stage in text
    for config in sorted((REPO / "configs").glob("*.yaml")):
        assert f"  {config.name} " in text
    assert seconds < 5  # 8 s with the imports; ~0.1 s on a quiet machine


def test_the_commands_listed_are_the_clis(capsys):
    assert list(SUBCOMMANDS) == list(DamCLI.subcommands())
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == top_level_help().strip()


def test_every_shipped_config_is_described_in_whole_sentences():
    described = shipped_configs()
    assert set(described) == {p.name for p in (REPO / "configs").glob("*.yaml")}
    for name, text in described.items():
        assert text.endswith(".") and "(" not in text and len(text) <= 161, (name, text)
    assert described["few_shot.yaml"].endswith("the paper's Fig. 6.")  # not cut at "Fig."


def test_a_commands_help_shows_its_whole_description(capsys):
    with pytest.raises(SystemExit):
        main(["diagnose", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert SUBCOMMANDS["diagnose"] in text
    assert "options of diagnose:" in text
    assert "the Gaussian gap and how:" not in text  # the docstring's first line, cut


def test_scores_are_printed_in_percent_and_other_metrics_as_they_are():
    table = metrics_table(
        {"val/target/miou": 0.80862, "val/target/iou/road": 0.9, "val/source/loss": 0.25},
        "validate",
    )
    assert table.splitlines() == [
        "validate results (scores in %; metrics.json holds them as fractions):",
        "  val/target/miou      80.86",
        "  val/target/iou/road  90.00",
        "  val/source/loss      0.2500",
    ]
