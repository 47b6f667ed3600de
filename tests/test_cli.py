"""The real entry point: every shipped config parses, the demo pipeline runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dam_lightning.cli import main

from .conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# only meaningful on top of an experiment config
OVERLAYS = {
    "ddp.yaml",
    "digits_reduced.yaml",
    "few_shot.yaml",
    "seg_demo_mnist.yaml",
    "seg_demo_usps.yaml",
}


def _tiny_demo_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=3",
        "--trainer.check_val_every_n_epoch=1",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--model.init_args.source_steps=5",
        "--data.source.init_args.num_samples=300",
        "--data.batch_size=32",
        *extra,
    ]


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.name not in OVERLAYS], ids=str)
def test_print_config_works_for_every_shipped_config(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("dam_lightning.modules.")


def test_ddp_overlay_parses_on_top_of_an_experiment(capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs/mnist_usps.yaml"),
                "--config",
                str(REPO / "configs/ddp.yaml"),
                "--print_config",
            ]
        )
    strategy = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.DDPStrategy"
    assert strategy["init_args"]["find_unused_parameters"] is True
    assert strategy["init_args"]["timeout"] == "0:10:00"  # not PyTorch's 30 minutes


def test_reduced_protocol_overlay_switches_both_domains_to_the_test_splits(capsys):
    with pytest.raises(SystemExit):
        main(
            ["fit", "--config", str(REPO / "configs/usps_mnist.yaml"),
             "--config", str(REPO / "configs/digits_reduced.yaml"), "--print_config"]
        )  # fmt: skip
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert data["source"]["class_path"].endswith("USPS")
    assert data["source"]["init_args"]["split"] == data["target"]["init_args"]["split"] == "test"
    assert data["source_val"] is None


def test_unknown_config_key_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (REPO / "configs/demo.yaml").read_text().replace("drift_weight:", "drift_wieght:")
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad), "--print_config"])
    assert exit_info.value.code != 0
    assert "drift_wieght" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_pipeline_runs_and_writes_its_summary(tmp_path, capsys):
    main(_tiny_demo_args(tmp_path))
    out = capsys.readouterr().out
    for row in ("source only", "after Gaussian matching", "after GAM"):
        assert row in out
    summaries = list(tmp_path.rglob("summary.json"))
    assert len(summaries) == 1
    rows = json.loads(summaries[0].read_text())
    assert list(rows) == ["source only", "after Gaussian matching", "after GAM"]
    assert all(0.0 <= row["acc"] <= 1.0 for row in rows.values())
    assert list(summaries[0].parent.glob("config.yaml"))  # config saved in the run's folder
    last = summaries[0].parent / "checkpoints" / "last.ckpt"
    assert last.is_file()

    validate = ["validate", *_tiny_demo_args(tmp_path)[1:], f"--ckpt_path={last}"]
    training_only = ("--trainer.max_epochs", "--trainer.limit")
    validate = [a for a in validate if not a.startswith(training_only)]
    main(validate)
    out = capsys.readouterr().out
    assert "validate results (scores in %; metrics.json holds them as fractions):" in out
    (acc,) = [line.split() for line in out.splitlines() if line.startswith("  val/target/acc ")]
    assert 1.0 < float(acc[1]) <= 100.0  # a percentage, as the summary prints it


@pytest.mark.slow
def test_second_run_with_wandb_logger_saves_its_config_too(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for _ in range(2):
        main(_tiny_demo_args(tmp_path, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1"))
    configs = list(tmp_path.rglob("config*.yaml"))
    assert len(configs) == 2 and configs[0].parent != configs[1].parent  # one folder per run


@pytest.mark.slow
def test_python_dash_m_entry_point(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dam_lightning",
            *_tiny_demo_args(
                tmp_path, "--trainer.max_epochs=1", "--model.init_args.source_steps=2"
            ),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "after GAM" in result.stdout


@pytest.mark.parametrize("name", ["mnist_usps.yaml", "usps_mnist.yaml"])
def test_gaussian_matching_snippet_in_the_digits_configs_works_when_pasted(name, tmp_path, capsys):
    """The digits configs leave Gaussian matching out and show, in a comment, how to add it:
    pasting that comment into trainer.callbacks must give a config that parses."""
    text = (REPO / "configs" / name).read_text()
    snippet = [
        line[len("#   ") :]
        for line in text.splitlines()
        if line.startswith("#   - class_path") or line.startswith("#     init_args")
    ]
    assert snippet and "GaussianMatching" in snippet[0]
    pasted_lines = "".join(f"    {s}\n" for s in snippet)
    pasted = text.replace("  callbacks:\n", "  callbacks:\n" + pasted_lines)
    config = tmp_path / name
    config.write_text(pasted)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    assert callbacks[0]["class_path"] == "dam_lightning.callbacks.GaussianMatching"
    assert callbacks[0]["init_args"]["every_n_epochs"] == 0


def test_source_augmentation_is_configurable_from_the_command_line(capsys):
    with pytest.raises(SystemExit):
        main(
            ["fit", "--config", str(REPO / "configs/usps_mnist_source.yaml"),
             "--model.augment", "dam_lightning.data.RandomAffine",
             "--model.augment.zoom", "[0.6, 1.0]", "--print_config"]
        )  # fmt: skip
    augment = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["augment"]
    assert augment["class_path"] == "dam_lightning.data.RandomAffine"
    assert augment["init_args"]["zoom"] == [0.6, 1.0]


def test_augmentation_flags_in_the_mnist_usps_source_config_comment_work(capsys):
    """configs/mnist_usps_source.yaml shows in a comment the flags that enlarge the source
    digits; given as written there, they must parse to RandomAffine with that zoom."""
    import shlex

    text = (REPO / "configs" / "mnist_usps_source.yaml").read_text()
    flags = [arg for line in text.splitlines() if line.startswith("#   --model.init_args.augment")
             for arg in shlex.split(line[1:])]  # fmt: skip
    assert len(flags) == 4
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs/mnist_usps_source.yaml"), *flags,
              "--print_config"])  # fmt: skip
    augment = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["augment"]
    assert augment["class_path"] == "dam_lightning.data.RandomAffine"
    assert augment["init_args"]["zoom"] == [1.0, 1.4]


@pytest.mark.parametrize("overlay", ["seg_demo_mnist.yaml", "seg_demo_usps.yaml"])
def test_the_segmentation_demo_variants_parse_on_top_of_the_demo(overlay, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs/seg_demo.yaml"),
              "--config", str(REPO / "configs" / overlay), "--print_config"])  # fmt: skip
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["logger"]["init_args"]["name"] == overlay.removesuffix(".yaml")


def test_a_cpu_run_takes_the_cores_other_work_leaves_free(monkeypatch):
    """Beside a busy process PyTorch's threads stall each other: one thread per free core,
    shared among the run's processes; OMP_NUM_THREADS set by the user wins."""
    import torch

    from dam_lightning import cpu_threads

    threads = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(cpu_threads.os, "cpu_count", lambda: 2)
        monkeypatch.setattr(cpu_threads, "busy_cores", lambda: 0.9)  # one other busy process
        torch.set_num_threads(2)
        line = cpu_threads.choose_cpu_threads(processes=1)
        assert torch.get_num_threads() == 1
        assert line.startswith("CPU threads: 1 per process (2 cores, 0.9 busy")
        monkeypatch.setattr(cpu_threads, "busy_cores", lambda: 0.05)  # a quiet machine
        torch.set_num_threads(2)
        cpu_threads.choose_cpu_threads(processes=1)
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        monkeypatch.setattr(cpu_threads, "busy_cores", lambda: 2.0)
        assert "OMP_NUM_THREADS" in cpu_threads.choose_cpu_threads(processes=1)
        assert torch.get_num_threads() == 2  # the user's choice stands
    finally:
        torch.set_num_threads(threads)
