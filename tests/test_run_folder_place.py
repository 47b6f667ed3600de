"""Where a command's run folder goes, read from its parsed config (``runs.run_folder_place``,
``runs.resumed_run_folder``): the CLI's choice, checked without running a command."""

from __future__ import annotations

import os

from jsonargparse import Namespace

from dam_lightning.runs import UNFINISHED_FILE, resumed_run_folder, run_folder_place


def config(logger=None, root="runs", configs=(), ckpt=None) -> Namespace:
    return Namespace(
        trainer=Namespace(logger=logger, default_root_dir=root), config=list(configs),
        ckpt_path=ckpt,
    )  # fmt: skip


WANDB = Namespace(
    class_path="lightning.pytorch.loggers.WandbLogger",
    init_args=Namespace(save_dir="wandb_runs", name="gta"),
)


def test_fit_goes_to_the_loggers_save_dir_and_name_else_the_root_and_the_config_files_name():
    parent, name = run_folder_place(config(logger=WANDB), "fit")
    assert parent == os.path.join("wandb_runs", "gta") and name[:2] == "20"
    parent, _ = run_folder_place(config(configs=["configs/a.yaml", "configs/seg_demo.yaml"]), "fit")
    assert parent == os.path.join("runs", "seg_demo")
    assert run_folder_place(config(root=None), "fit")[0] == os.path.join(".", "run")


def test_evaluation_goes_into_the_run_folder_of_its_checkpoint(tmp_path):
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    parent, name = run_folder_place(config(logger=WANDB, ckpt=ckpt), "validate")
    assert parent == str(tmp_path / "run") and name.startswith("validate-20")
    elsewhere = run_folder_place(config(logger=WANDB, ckpt=str(tmp_path / "x.ckpt")), "predict")
    assert elsewhere[0] == os.path.join("wandb_runs", "gta")


def test_only_a_fit_from_an_unfinished_runs_checkpoint_resumes_in_that_folder(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    ckpt = checkpoints / "last.ckpt"
    ckpt.write_bytes(b"")
    assert resumed_run_folder(config(ckpt=str(ckpt)), "fit") is None  # finished: a new folder
    (tmp_path / "run" / UNFINISHED_FILE).write_text("running")
    assert resumed_run_folder(config(ckpt=str(ckpt)), "fit") == str(tmp_path / "run")
    assert resumed_run_folder(config(ckpt=str(ckpt)), "validate") is None
    other = tmp_path / "run" / "last.ckpt"  # not in checkpoints/
    other.write_bytes(b"")
    assert resumed_run_folder(config(ckpt=str(other)), "fit") is None
