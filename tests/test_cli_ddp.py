"""Several processes through the real CLI: a GAM config on 2 CPU processes picks its DDP flavour
and runs to the end; a 2-process run resumed from its epoch-0 checkpoint ends with the weights of
the uninterrupted one; the shuffle survives Lightning's distributed sampler wrapper; the
multi-node commands of docs/configuration.md parse."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

from dam_lightning.cli import main
from dam_lightning.data.datamodule import EpochShuffleSampler

from .conftest import REPO

EVERY_EPOCH = """
trainer:
  callbacks:
    - class_path: dam_lightning.callbacks.GaussianMatching
      init_args: {calibration_batches: 2, every_n_epochs: 1}
    - class_path: dam_lightning.callbacks.AdaptationSummary
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {filename: "{epoch}", save_top_k: -1, save_last: true,
                  save_on_train_epoch_end: true}
"""


def _two_processes(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    overlay = tmp_path / "every_epoch.yaml"
    overlay.write_text(EVERY_EPOCH)
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    env.pop("WANDB_SILENT", None)  # W&B says goodbye, as in a terminal
    command = [
        sys.executable, "-m", "dam_lightning", "fit", "--config", str(REPO / "configs/demo.yaml"),
        "--config", str(overlay), "--trainer.devices=2", "--trainer.accelerator=cpu",
        "--trainer.max_epochs=3", "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=2", "--trainer.check_val_every_n_epoch=1",
        "--model.init_args.source_steps=3", "--data.source.init_args.num_samples=256",
        # 48 target images per process: one batch, cycled three times per epoch
        "--data.target=dam_lightning.data.SynDigits", "--data.target.num_samples=96",
        "--data.target.seed=1", "--data.batch_size=32", *extra,
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]
    return result


def _run_folder(out: str) -> tuple[str, list[str]]:
    lines = out.strip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("Run folder: "))
    return lines[start].removeprefix("Run folder: "), lines[start:]


@pytest.mark.slow
def test_two_cpu_processes_run_gam_to_the_end_and_a_resume_matches_the_uninterrupted_run(
    tmp_path,
):
    straight = _two_processes(tmp_path)
    out = straight.stdout
    assert "Strategy: ddp_find_unused_parameters_true (GAMAdaptModule on 2 processes)" in out
    assert "Source network trained for 3 batches on 2 processes" in out
    assert re.search(r"Epoch 0: 100%\|.*\| 3/3 .*train/source_loss=\d", out)  # Lightning's bar
    assert "after GAM" in out
    folder, tail = _run_folder(out)
    assert "wandb: Find logs at" in out
    assert not any(line.startswith("wandb:") for line in tail)  # our lines come after W&B's
    assert any(line.startswith(f"  W&B upload:  wandb sync {folder}/wandb/") for line in tail)
    assert re.fullmatch(r"runs/demo/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d(-\d+)?", folder)
    assert list((tmp_path / folder / "wandb").glob("offline-run-*"))  # W&B's id inside
    assert "Gaussian matching at epoch 1" in out  # stage 1 is epoch 0
    assert "Gaussian matching at epoch 2" not in out  # on screen only once
    assert "Gaussian matching at epoch 2" in (tmp_path / folder / "log.txt").read_text()
    for noise in ("💡 Tip", "anonymous setting", "LeafSpec", "sync_dist=True", "git root"):
        assert noise not in out
    checkpoints = tmp_path / folder / "checkpoints"

    resumed = _two_processes(tmp_path, f"--ckpt_path={checkpoints / 'epoch=0.ckpt'}")
    resumed_folder, _ = _run_folder(resumed.stdout)
    assert resumed_folder != folder
    expected = torch.load(checkpoints / "last.ckpt", weights_only=False)
    got = torch.load(tmp_path / resumed_folder / "checkpoints" / "last.ckpt", weights_only=False)
    # resumed from inside stage 1: 3 source steps, then 2 epochs of 3 batches x (D + G)
    assert got["global_step"] == expected["global_step"] == 3 + 2 * 3 * 2
    different = [
        name
        for name, value in expected["state_dict"].items()
        if not torch.equal(value, got["state_dict"][name])
    ]
    assert different == []
    assert "Resuming from" in (tmp_path / resumed_folder / "log.txt").read_text()


def test_the_shuffle_reaches_the_sampler_through_lightnings_distributed_wrapper():
    """Under DDP Lightning wraps EpochShuffleSampler in DistributedSamplerWrapper: set_epoch
    must reach it, each pass of a cycled loader must get a new order, and a fresh sampler (a
    resumed run) at the same epoch must give the same batches."""

    def passes(epoch: int, rank: int, count: int = 2) -> list[list[int]]:
        inner = EpochShuffleSampler(10, seed=3)
        wrapper = DistributedSamplerWrapper(inner, num_replicas=2, rank=rank, shuffle=True)
        wrapper.set_epoch(epoch)
        assert inner.epoch == epoch
        return [list(wrapper) for _ in range(count)]

    rank0, rank1 = passes(4, 0), passes(4, 1)
    for first, second in zip(rank0, rank1, strict=True):
        assert sorted(first + second) == list(range(10))  # the ranks split each pass
    assert rank0[0] != rank0[1]  # a new order for the second pass within the epoch
    assert passes(4, 0) == rank0  # reproduced from scratch: what a resumed run sees
    assert passes(5, 0) != rank0


def _multi_node_commands() -> list[list[str]]:
    text = (REPO / "docs" / "configuration.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            if line.startswith(("srun ", "torchrun ")) and " dam_lightning " in line:
                args = shlex.split(line.split(" dam_lightning ", 1)[1])
                commands.append([a for a in args if not a.startswith("$")])
    return commands


def test_the_multi_node_commands_of_the_docs_parse(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    commands = _multi_node_commands()
    assert len(commands) >= 2  # srun and torchrun
    for args in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--print_config"])
        assert exit_info.value.code == 0, args
        trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
        assert trainer["num_nodes"] == 2 and str(trainer["devices"]) == "4"
        assert trainer["strategy"]["init_args"]["find_unused_parameters"] is True
