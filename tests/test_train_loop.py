"""``ldm.train_loop.run_training`` on a tiny real model: what it logs and checks per optimizer step."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from ldm.distributed import make_accelerator
from ldm.train_loop import LoopConfig, make_optimizer, run_training

pytestmark = pytest.mark.usefixtures("single_thread")


@dataclass
class Out:
    loss: torch.Tensor


def setup(tmp_path, accumulation: int, learning_rate: float = 1e-2):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = make_accelerator(tmp_path, gradient_accumulation_steps=accumulation, report_to="none")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    data = torch.utils.data.TensorDataset(torch.randn(12, 3), torch.randn(12, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=2, shuffle=True)
    optimizer = make_optimizer(list(model.parameters()), learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return accelerator, *accelerator.prepare(model, optimizer, loader, scheduler)


def test_logged_loss_is_the_mean_over_accumulated_micro_batches(tmp_path):
    accelerator, model, optimizer, loader, scheduler = setup(tmp_path, accumulation=3)
    micro = []

    def loss_fn(batch, generator):
        x, y = batch
        loss = (model(x) - y).pow(2).mean() * (1 + len(micro))  # every micro-batch differs
        micro.append(loss.item())
        return Out(loss)

    cfg = LoopConfig(tmp_path, max_train_steps=2, checkpointing_steps=10, gradient_accumulation_steps=3,
                     images_per_step=6)
    run_training(accelerator, model, optimizer, scheduler, loader, loss_fn, cfg)
    assert len(micro) == 6 and len(cfg.history) == 2
    for step, logs in enumerate(cfg.history):
        assert logs["loss"] == pytest.approx(sum(micro[3 * step: 3 * step + 3]) / 3, rel=1e-6)
        assert logs["grad_norm"] > 0 and logs["images_per_s"] > 0 and logs["lr"] == pytest.approx(1e-2)


def test_a_non_finite_micro_batch_stops_before_the_update(tmp_path):
    accelerator, model, optimizer, loader, scheduler = setup(tmp_path, accumulation=2)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def loss_fn(batch, generator):
        x, y = batch
        calls.append(1)
        loss = (model(x) - y).pow(2).mean()
        return Out(loss * float("nan") if len(calls) == 1 else loss)  # the first micro-batch of step 1

    cfg = LoopConfig(tmp_path, max_train_steps=2, checkpointing_steps=10, gradient_accumulation_steps=2)
    with pytest.raises(RuntimeError, match="non-finite.*at step 1"):
        run_training(accelerator, model, optimizer, scheduler, loader, loss_fn, cfg)
    for old, new in zip(before, model.parameters()):
        assert torch.equal(old, new.detach())


def test_a_resumed_run_goes_on_at_its_own_learning_rate(tmp_path, caplog):
    """A checkpoint restores the scheduler of the run that wrote it, rates included: a run resumed with another
    learning rate goes on at that one from its first update, with a warning naming both; the same rate, no warning."""
    def train(learning_rate: float, steps: int, resume: str | None = None) -> list[float]:
        accelerator, model, optimizer, loader, scheduler = setup(tmp_path, 1, learning_rate)
        used = []

        def loss_fn(batch, generator):
            used.append(optimizer.param_groups[0]["lr"])  # the rate this step's update will use
            x, y = batch
            return Out((model(x) - y).pow(2).mean())

        cfg = LoopConfig(tmp_path, max_train_steps=steps, checkpointing_steps=2, resume_from_checkpoint=resume)
        run_training(accelerator, model, optimizer, scheduler, loader, loss_fn, cfg)
        return used + [cfg.history[-1]["lr"]]

    assert train(1e-2, 2) == pytest.approx([1e-2] * 3)
    with caplog.at_level("WARNING", logger="ldm.checkpointing"):
        assert train(1e-3, 4, "latest") == pytest.approx([1e-3] * 3)
    assert "trained at learning rate 0.01; this run goes on at --learning_rate 0.001" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ldm.checkpointing"):
        assert train(1e-3, 5, "latest") == pytest.approx([1e-3] * 2)
    assert "learning rate" not in caplog.text


@pytest.mark.parametrize("env, refused", [
    ({"ACCELERATE_USE_FSDP": "true"}, "FSDP shards the model's parameters"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "DeepSpeed ZeRO-3 shards"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, None),
    ({}, None),
])
def test_parameter_sharding_is_refused_before_training(tmp_path, monkeypatch, env, refused):
    """What `accelerate launch --use_fsdp` (or a ZeRO-3 config) puts in the environment is refused with a message
    before anything is built: the EMA, sync check, validation and save read whole weights."""
    from ldm.distributed import check_unsharded

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if refused is None:
        check_unsharded()
        return
    with pytest.raises(ValueError, match=refused + ".*Use data parallelism"):
        make_accelerator(tmp_path / "out", report_to="none")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
