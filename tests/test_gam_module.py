"""GAMAdaptModule: each step updates exactly the right parameters; F_s never changes."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from dam_lightning.callbacks import GaussianMatching
from dam_lightning.data import DomainAdaptationDataModule
from dam_lightning.models import LeNet
from dam_lightning.modules import GAMAdaptModule, SourceModule

from .conftest import quiet_trainer


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(before: dict, module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p)}


class StepSpy(GAMAdaptModule):
    """Records which parameters each of the two steps changed, and which got gradients."""

    def setup(self, stage: str) -> None:
        self.records = []

    def _record(self, step: str, run, *args):
        self.zero_grad(set_to_none=True)  # observe only the gradients this step's backward makes
        before = _snapshot(self)
        result = run(*args)
        with_grad = {n for n, p in self.named_parameters() if p.grad is not None}
        self.records.append((step, _changed(before, self), with_grad))
        return result

    def _discriminator_step(self, *args):
        return self._record("D", super()._discriminator_step, *args)

    def _target_step(self, *args):
        return self._record("G", super()._target_step, *args)


_trainer = quiet_trainer


def test_discriminator_step_and_target_step_update_exactly_their_own_parameters(tiny_digits):
    source, target = tiny_digits
    dm = DomainAdaptationDataModule(source, target, batch_size=32)
    module = StepSpy(LeNet, num_classes=10, layers={"fc3": 0.1, "fc4": 1.0}, source_steps=5)
    _trainer(max_steps=11).fit(module, dm)  # 5 source batches, then 3 x (D step + G step)

    params = {n for n, _ in module.named_parameters()}
    discriminators = {n for n in params if n.startswith("discriminators.")}
    target_net = {n for n in params if n.startswith("target_net.")}
    assert [r[0] for r in module.records] == ["D", "G"] * 3
    for step, changed, with_grad in module.records:
        expected = discriminators if step == "D" else target_net
        assert changed == expected, f"{step} step changed {sorted(changed ^ expected)[:5]}"
        assert with_grad <= expected, f"{step} step put gradients on {sorted(with_grad - expected)}"


def test_source_network_stays_bitwise_identical_and_in_eval_mode(tiny_digits):
    source, target = tiny_digits
    dm = DomainAdaptationDataModule(source, target, batch_size=32)
    module = GAMAdaptModule(LeNet, num_classes=10, source_steps=5)
    trainer = _trainer(max_steps=7)
    trainer.fit(module, dm)  # trains F_s (5 source batches), adapts for 1 batch
    trained_source = _snapshot(module.source_net)
    trainer = _trainer(max_steps=10, callbacks=[GaussianMatching(calibration_batches=2)])
    trainer.fit(module, dm)  # continues from the trained F_s: no retraining
    assert _changed(trained_source, module.source_net) == set()
    assert not module.source_net.training
    assert all(not p.requires_grad for p in module.source_net.parameters())
    assert _changed(trained_source, module.target_net)  # F_t moved away from F_s


def test_target_network_starts_as_a_copy_of_the_source(tiny_digits, tmp_path):
    source, target = tiny_digits
    dm = DomainAdaptationDataModule(source, target, batch_size=32)
    src = SourceModule(LeNet, num_classes=10)
    trainer = _trainer(max_steps=3, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(src, dm)
    ckpt = tmp_path / "source.ckpt"
    trainer.save_checkpoint(ckpt)

    module = GAMAdaptModule(LeNet, num_classes=10, source_weights=str(ckpt))
    _trainer(max_steps=0, max_epochs=1, limit_train_batches=0).fit(module, dm)
    for name, p in src.net.state_dict().items():
        assert torch.equal(module.source_net.state_dict()[name], p)
        assert torch.equal(module.target_net.state_dict()[name], p)


def test_gaussian_only_configuration_trains_nothing_but_matches(tiny_digits):
    source, target = tiny_digits
    dm = DomainAdaptationDataModule(source, target, batch_size=32)
    module = GAMAdaptModule(LeNet, num_classes=10, layers={}, drift_weight=0, source_steps=5)
    assert len(module.discriminators) == 0
    matching = GaussianMatching(calibration_batches=2)
    trainer = _trainer(max_epochs=1, limit_train_batches=7, callbacks=[matching])
    trainer.fit(module, dm)
    # the 5 source steps of stage 1, then no optimiser step: the callback did all the work
    assert trainer.global_step == 5
    assert module.adapting
    assert _changed(_snapshot(module.source_net), module.target_net)


def test_nothing_to_adapt_is_a_clear_error(tiny_digits):
    source, target = tiny_digits
    dm = DomainAdaptationDataModule(source, target, batch_size=32)
    module = GAMAdaptModule(LeNet, num_classes=10, layers={}, drift_weight=0, source_steps=5)
    with pytest.raises(ValueError, match="nothing would adapt.*GaussianMatching"):
        _trainer(max_steps=7).fit(module, dm)  # raised at the first adaptation batch


def test_missing_source_network_is_a_clear_error(tiny_digits, tmp_path):
    source, target = tiny_digits
    dm = DomainAdaptationDataModule(source, target, batch_size=32)
    with pytest.raises(ValueError, match="source_weights.*source_steps"):
        _trainer(max_steps=2).fit(GAMAdaptModule(LeNet, num_classes=10), dm)
    missing = tmp_path / "nope.ckpt"
    module = GAMAdaptModule(LeNet, num_classes=10, source_weights=str(missing))
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        _trainer(max_steps=2).fit(module, dm)


def test_wrong_layer_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no layer named 'fc9'.*fc4"):
        GAMAdaptModule(LeNet, num_classes=10, layers={"fc9": 1.0})


def test_source_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "five_classes.pt"
    torch.save(LeNet(5).state_dict(), path)
    from dam_lightning.weights import load_network_weights

    with pytest.raises(ValueError, match="five_classes.pt does not fit LeNet"):
        load_network_weights(LeNet(10), str(path))


class AnchorSpy(L.Callback):
    """At the first batch of every epoch (after GaussianMatching ran), records whether the drift
    reference equals F_t (just matched) and whether it still equals F_s."""

    def __init__(self):
        self.at_epoch_start = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            anchor = pl_module.drift_reference.state_dict()
            self.at_epoch_start.append(
                (
                    _same(anchor, pl_module.target_net.state_dict()),
                    _same(anchor, pl_module.source_net.state_dict()),
                )
            )


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_matched_drift_anchor_moves_to_the_weights_of_each_gaussian_matching(tiny_digits):
    source, target = tiny_digits
    dm = DomainAdaptationDataModule(source, target, batch_size=32)
    module = GAMAdaptModule(
        LeNet, num_classes=10, layers={"fc4": 1.0}, drift_anchor="matched", source_steps=5
    )
    spy = AnchorSpy()
    matching = GaussianMatching(calibration_batches=2, every_n_epochs=1)
    _trainer(max_epochs=3, limit_train_batches=5, callbacks=[matching, spy]).fit(module, dm)
    # Each adaptation epoch starts with F_t freshly matched and the anchor equal to it, not F_s
    # (epoch 0 is stage 1, where the anchor is F_s and F_t its untrained copy).
    assert spy.at_epoch_start[1:] == [(True, False), (True, False)]
    assert not _same(module.drift_reference.state_dict(), module.target_net.state_dict())
    assert any(k.startswith("drift_anchor_net.") for k in module.state_dict())  # checkpointed
    assert all(not p.requires_grad for p in module.drift_reference.parameters())


def test_source_drift_anchor_is_the_source_network(tiny_digits):
    source, target = tiny_digits
    dm = DomainAdaptationDataModule(source, target, batch_size=32)
    module = GAMAdaptModule(LeNet, num_classes=10, layers={"fc4": 1.0}, source_steps=5)
    spy = AnchorSpy()
    matching = GaussianMatching(calibration_batches=2, every_n_epochs=1)
    _trainer(max_epochs=2, limit_train_batches=5, callbacks=[matching, spy]).fit(module, dm)
    assert module.drift_reference is module.source_net
    assert spy.at_epoch_start[1:] == [(False, True)]  # F_t was matched away from the anchor F_s


def test_unknown_drift_anchor_is_a_clear_error():
    with pytest.raises(ValueError, match="drift_anchor must be 'source' or 'matched'.*'sorce'"):
        GAMAdaptModule(LeNet, num_classes=10, drift_anchor="sorce")


class GapSpy(GAMAdaptModule):
    """Counts the batches whose activation gaps were measured."""

    def setup(self, stage: str) -> None:
        self.measured = 0

    def _log_activation_gaps(self, *args):
        self.measured += 1
        super()._log_activation_gaps(*args)


def test_activation_gaps_are_measured_only_on_batches_whose_logs_are_written(tiny_digits):
    """The per-layer gap costs device syncs: measured every log_every_n_steps batches and at
    the fit's last batch only."""
    source, target = tiny_digits
    dm = DomainAdaptationDataModule(source, target, batch_size=16)
    module = GapSpy(LeNet, num_classes=10, layers={"fc4": 1.0}, source_steps=1)
    _trainer(max_steps=13, log_every_n_steps=3).fit(module, dm)  # 1 source, 6 GAM batches
    assert module.measured == 3  # batches 2 and 5 (logged), 6 (the last)


def _mixed(precision: str) -> dict:
    """Trainer arguments for a mixed precision; "16-mixed" with a GradScaler also on the CPU
    (Lightning turns a plain "16-mixed" into bf16 there, without a scaler)."""
    if precision == "16-mixed":
        from lightning.pytorch.plugins import MixedPrecision

        return {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]}
    return {"precision": precision}


class FirstAdaptationBatch(L.Callback):
    """Snapshots of the discriminators and F_t around the first adaptation batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.adapting and not hasattr(self, "before"):
            self.before = (_snapshot(pl_module.discriminators), _snapshot(pl_module.target_net))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if hasattr(self, "before") and not hasattr(self, "after"):
            self.after = (_snapshot(pl_module.discriminators), _snapshot(pl_module.target_net))


class InfInDiscriminatorGradient(GAMAdaptModule):
    """At the first adaptation batch, one discriminator gradient becomes inf (an fp16 overflow)."""

    poisoned = False

    def on_after_backward(self) -> None:
        grad = next(self.discriminators.parameters()).grad
        if self.adapting and not self.poisoned and grad is not None:
            grad.fill_(float("inf"))
            self.poisoned = True


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_gam_steps_train_both_networks(tiny_digits, precision):
    source, target = tiny_digits
    dm = DomainAdaptationDataModule(source, target, batch_size=32)
    module = GAMAdaptModule(LeNet, num_classes=10, layers={"fc3": 0.1, "fc4": 1.0}, source_steps=2)
    spy = FirstAdaptationBatch()
    trainer = _trainer(max_steps=2 + 2 * 3, callbacks=[spy], **_mixed(precision))
    trainer.fit(module, dm)
    for key in ("layer/fc3/loss_d", "layer/fc4/loss_g", "train/drift", "train/loss_g"):
        assert torch.isfinite(trainer.callback_metrics[key]), key
    d_before, t_before = spy.before
    assert _changed(d_before, module.discriminators) and _changed(t_before, module.target_net)


def test_an_inf_gradient_skips_only_the_step_of_the_optimizer_it_hit(tiny_digits, tmp_path):
    """16-mixed: the GradScaler skips the discriminators' step whose gradient overflowed, F_t
    still steps, the scale halves; the scaler's state is saved and a resume restores it."""
    source, target = tiny_digits
    dm = DomainAdaptationDataModule(source, target, batch_size=32)
    module = InfInDiscriminatorGradient(LeNet, num_classes=10, layers={"fc4": 1.0}, source_steps=2)
    spy = FirstAdaptationBatch()
    trainer = _trainer(max_steps=2 + 2, callbacks=[spy], **_mixed("16-mixed"))
    trainer.fit(module, dm)  # stage 1, then one adaptation batch: the poisoned one
    d_before, t_before = spy.before
    assert module.poisoned
    assert not _changed(d_before, module.discriminators)  # D's step skipped
    assert _changed(t_before, module.target_net)  # F_t's step taken
    scale = trainer.precision_plugin.scaler.get_scale()
    assert scale == 65536.0 / 2
    checkpoint = tmp_path / "inf.ckpt"
    trainer.save_checkpoint(checkpoint)

    resumed = _trainer(max_steps=2 + 2, **_mixed("16-mixed"))
    resumed.fit(GAMAdaptModule(LeNet, num_classes=10, layers={"fc4": 1.0}, source_steps=2), dm,
                ckpt_path=checkpoint)  # fmt: skip
    assert resumed.precision_plugin.scaler.get_scale() == scale


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_16_bit_weights_are_refused_naming_bf16_mixed(tiny_digits, precision):
    source, target = tiny_digits
    dm = DomainAdaptationDataModule(source, target, batch_size=32)
    module = GAMAdaptModule(LeNet, num_classes=10, source_steps=2)
    with pytest.raises(ValueError, match=f"precision='{precision}'.*bf16-mixed"):
        _trainer(max_steps=2, precision=precision).fit(module, dm)
