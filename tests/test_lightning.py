"""The Lightning plugin with a real `lightning.Trainer` on CPU: resume is bit-identical."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")
lightning = pytest.importorskip("lightning", reason="lightning is not installed")

import arrayckpt as ac  # noqa: E402
from arrayckpt.lightning import ArrayckptCheckpointIO  # noqa: E402


class Regression(lightning.LightningModule):  # type: ignore[misc]
    """A tiny deterministic model whose optimizer and LR schedule both carry state."""

    def __init__(self, hidden: int = 8, lr: float = 0.05, root: Any = "data") -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return [opt], [sched]

    def train_dataloader(self) -> Any:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 4, generator=g)
        y = x.sum(dim=1, keepdim=True).sin()
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def trainer(root: Path, epochs: int, *, checkpointing: bool = True, **kw: Any) -> Any:
    callbacks = []
    if checkpointing:
        callbacks.append(lightning.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_last=True))
    return lightning.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=root,
        enable_checkpointing=checkpointing,
        callbacks=callbacks,
        plugins=[ArrayckptCheckpointIO()],
        **kw,
    )


def weights(module: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_resume_with_ckpt_path_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = Regression()
    trainer(tmp_path / "straight", 4).fit(straight)

    first = Regression()
    trainer(tmp_path / "run", 2).fit(first)  # teardown waits for the last write
    # ModelCheckpoint(save_top_k=1) removed epoch 0's checkpoint through remove_checkpoint
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["epoch=1-step=8.ckpt", "last.ckpt"]
    last = ac.load_checkpoint(tmp_path / "run" / "last.ckpt")  # a plain arrayckpt checkpoint
    assert (last.training_state.step, last.training_state.epoch) == (8, 1)
    assert set(last.model) == set(first.state_dict())

    resumed = Regression()
    resumed_trainer = trainer(tmp_path / "run", 4)
    resumed_trainer.fit(resumed, ckpt_path=tmp_path / "run" / "last.ckpt")
    assert resumed_trainer.global_step == 16
    expected = weights(straight)
    for name, value in weights(resumed).items():
        assert torch.equal(value, expected[name]), name
    assert resumed_trainer.optimizers[0].param_groups[0]["lr"] == 0.05 * 0.5**4


def test_the_checkpoint_dict_comes_back_as_lightning_saved_it(tmp_path: Path) -> None:
    module = Regression(hidden=3)
    t = trainer(tmp_path, 1, checkpointing=False)
    t.fit(module)
    t.save_checkpoint(tmp_path / "manual.ckpt")  # outside fit: teardown is ours to call
    io = t.strategy.checkpoint_io
    io.teardown()
    loaded = io.load_checkpoint(tmp_path / "manual.ckpt", map_location="cpu")
    original = t._checkpoint_connector.dump_checkpoint()
    assert set(loaded) == set(original)
    for key in ("epoch", "global_step", "loops", "hyper_parameters", "lr_schedulers"):
        assert loaded[key] == original[key], key
    opt, saved_opt = original["optimizer_states"][0], loaded["optimizer_states"][0]
    assert saved_opt["param_groups"] == opt["param_groups"]
    for index, state in opt["state"].items():
        for name, value in state.items():
            assert torch.equal(saved_opt["state"][index][name], value), (index, name)
    for name, value in original["state_dict"].items():
        assert torch.equal(loaded["state_dict"][name], value), name
    # what load_from_checkpoint does, with a file it cannot read (see docs/lightning.md)
    again = Regression(**loaded["hyper_parameters"])
    again.load_state_dict(loaded["state_dict"])
    for name, value in weights(module).items():
        assert torch.equal(again.state_dict()[name], value), name


def test_a_path_hyper_parameter_is_refused_naming_its_key(tmp_path: Path) -> None:
    module = Regression(root=tmp_path / "data")
    t = trainer(tmp_path, 1, checkpointing=False, max_steps=1)
    t.fit(module)
    with pytest.raises(ac.InvalidInputError, match=r"hyper_parameters.*root.*str\(path\)"):
        t.save_checkpoint(tmp_path / "bad.ckpt")
    t.strategy.checkpoint_io.teardown()
    assert not (tmp_path / "bad.ckpt").exists()


def test_remove_checkpoint_refuses_what_is_not_a_checkpoint(tmp_path: Path) -> None:
    stray = tmp_path / "notes.ckpt"
    stray.mkdir()
    (stray / "keep.txt").write_text("mine")
    with pytest.raises(ac.CheckpointNotFoundError, match="not a complete arrayckpt"):
        ArrayckptCheckpointIO().remove_checkpoint(stray)
    assert (stray / "keep.txt").read_text() == "mine"


def test_remove_checkpoint_removes_a_link_and_keeps_its_target(tmp_path: Path) -> None:
    io = ArrayckptCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "epoch": 0}, tmp_path / "e0.ckpt")
    (tmp_path / "last.ckpt").symlink_to("e0.ckpt")  # as ModelCheckpoint(save_last="link")
    io.remove_checkpoint(tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e0.ckpt"]
    assert torch.equal(io.load_checkpoint(tmp_path / "e0.ckpt")["state_dict"]["w"], torch.ones(2))
    io.remove_checkpoint(tmp_path / "e0.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_is_raised_by_teardown(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the checkpoint's parent directory should be")
    io = ArrayckptCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "epoch": 0}, blocker / "x.ckpt")
    with pytest.raises(ac.CheckpointWriteError):
        io.teardown()
    io.teardown()  # raised once; the plugin is usable again
