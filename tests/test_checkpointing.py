"""Checkpoint verification and fall-back, and the non-finite-loss guard, on folders and tensors made
here (the training scripts' own use of them is in test_training.py)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

from latentdiff.trainer.checkpointing import (
    STATE_FILE,
    DamagedCheckpointError,
    NonFiniteLossError,
    NonFiniteLossGuard,
    _describe_file,
    list_checkpoints,
    resolve_resume,
    verify_checkpoint,
)


def make_checkpoint(output_dir: Path, step: int) -> Path:
    """A checkpoint folder as save_checkpoint leaves it: files, then the state file listing them."""
    folder = output_dir / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 16)
    (folder / "optimizer.bin").write_bytes(b"optimizer state" * 100)
    files = {name: _describe_file(str(folder / name)) for name in ("model.safetensors", "optimizer.bin")}
    (folder / STATE_FILE).write_text(json.dumps({"global_step": step, "files": files}))
    return folder


def test_an_intact_checkpoint_verifies_and_each_kind_of_damage_is_named(tmp_path):
    folder = make_checkpoint(tmp_path, 4)
    assert verify_checkpoint(str(folder)) is None

    (folder / "model.safetensors").write_bytes((bytes(range(256)) * 16)[:1000])
    assert verify_checkpoint(str(folder)) == "model.safetensors has 1000 bytes, 4096 were written"

    (folder / "model.safetensors").write_bytes(bytes(reversed(range(256))) * 16)  # same size, other bytes
    assert verify_checkpoint(str(folder)) == "model.safetensors is not the file that was written (SHA-256 differs)"

    (folder / "model.safetensors").unlink()
    assert verify_checkpoint(str(folder)) == "model.safetensors is missing"

    (folder / STATE_FILE).write_text('{"global_step": 4, "fil')
    assert verify_checkpoint(str(folder)).startswith(f"{STATE_FILE} cannot be read")


def test_latest_falls_back_to_the_newest_intact_checkpoint_and_sets_the_damaged_ones_aside(tmp_path, caplog):
    for step in (2, 4, 6):
        make_checkpoint(tmp_path, step)
    checkpoints = tmp_path / "checkpoints"
    with open(checkpoints / "checkpoint-6" / "model.safetensors", "r+b") as file:
        file.truncate(100)
    (checkpoints / "checkpoint-4" / "optimizer.bin").unlink()

    with caplog.at_level("WARNING", logger="latentdiff"):
        assert resolve_resume(str(tmp_path), "latest") == str(checkpoints / "checkpoint-2")
    warnings = "\n".join(record.getMessage() for record in caplog.records)
    assert f"checkpoint {checkpoints / 'checkpoint-6'} is damaged (model.safetensors has 100 bytes" in warnings
    assert f"checkpoint {checkpoints / 'checkpoint-4'} is damaged (optimizer.bin is missing)" in warnings
    # kept for inspection under a name that resume=latest and the total-limit pruning ignore
    assert sorted(p.name for p in checkpoints.iterdir()) == [".damaged-checkpoint-4", ".damaged-checkpoint-6", "checkpoint-2"]
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [2]


def test_with_every_checkpoint_damaged_resume_stops_and_moves_nothing(tmp_path):
    for step in (2, 4):
        (make_checkpoint(tmp_path, step) / "optimizer.bin").unlink()
    with pytest.raises(DamagedCheckpointError, match=r"every checkpoint under .* is damaged \(checkpoint-4: optimizer.bin"):
        resolve_resume(str(tmp_path), "latest")
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [2, 4]


def test_an_explicit_damaged_checkpoint_is_an_error(tmp_path):
    folder = make_checkpoint(tmp_path, 2)
    (folder / "model.safetensors").write_bytes(b"x")
    with pytest.raises(DamagedCheckpointError, match="the checkpoint is damaged: model.safetensors has 1 bytes"):
        resolve_resume(str(tmp_path), str(folder))


def test_the_guard_records_the_first_non_finite_step_on_the_device_without_reading_it():
    # A tensor on the meta device has no data: any read of a value on the host (.item(), bool(), a
    # Python `if` on it) raises. observe() must work on it: it keeps everything on the device.
    guard = NonFiniteLossGuard("unused")
    for step in range(1, 4):
        guard.observe(torch.tensor(float("nan"), device="meta"), step)
    assert guard.first_bad_step.device.type == "meta"
    with pytest.raises(RuntimeError, match="meta"):
        bool(guard.first_bad_step >= 0)  # the meta device does refuse host reads

    guard = NonFiniteLossGuard("unused")
    for step, loss in enumerate([0.5, 0.4, float("nan"), float("inf"), 0.3], start=1):
        guard.observe(torch.tensor(loss), step)
    assert guard.first_bad_step.item() == 3


def test_the_guard_check_names_the_step_and_the_last_good_checkpoint(tmp_path):
    make_checkpoint(tmp_path, 4)
    single_process = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda tensor: tensor)
    guard = NonFiniteLossGuard(str(tmp_path))
    guard.observe(torch.tensor(0.5), 5)
    guard.check(single_process, 5, [torch.ones(3)])  # all finite: no error
    with pytest.raises(NonFiniteLossError, match="the weights hold non-finite values"):
        guard.check(single_process, 5, [torch.ones(3), torch.tensor([1.0, float("inf")])])
    guard.observe(torch.tensor([0.1, float("nan")]), 6)
    guard.observe(torch.tensor(float("nan")), 7)
    with pytest.raises(NonFiniteLossError) as error:
        guard.check(single_process, 8)
    message = str(error.value)
    assert "the training loss was not finite (nan or inf) at step 6" in message
    assert str(tmp_path / "checkpoints" / "checkpoint-4") in message


def test_a_kill_while_an_old_checkpoint_is_deleted_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    import shutil

    from accelerate import Accelerator

    import latentdiff.trainer.checkpointing as checkpointing

    make_checkpoint(tmp_path, 1)
    make_checkpoint(tmp_path, 2)
    real_rmtree = shutil.rmtree

    def killed_while_deleting(path, ignore_errors=False):
        if (Path(path) / STATE_FILE).is_file():  # deleting an old checkpoint
            (Path(path) / STATE_FILE).unlink()  # the deletion gets this far ...
            raise KeyboardInterrupt  # ... and the process dies
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(checkpointing.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.save_checkpoint(Accelerator(cpu=True), str(tmp_path), checkpointing.TrainingState(global_step=3), 2)
    folder = tmp_path / "checkpoints"
    published = sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint-"))
    assert published == ["checkpoint-2", "checkpoint-3"]
    assert all((folder / name / STATE_FILE).is_file() for name in published)  # none half deleted
    monkeypatch.setattr(checkpointing.shutil, "rmtree", real_rmtree)
    checkpointing.remove_partial_checkpoints(str(tmp_path))  # what the next start does
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_a_folder_written_in_place_replaces_the_old_one_whole_or_not_at_all(tmp_path):
    from latentdiff.files import folder_written_in_place

    folder = tmp_path / "pipeline"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with folder_written_in_place(str(folder)) as partial:
            (Path(partial) / "new.txt").write_text("half")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in folder.iterdir()) == ["old.txt"]  # the old folder, untouched
    with folder_written_in_place(str(folder)) as partial:  # the leftover .partial is cleared first
        assert list(Path(partial).iterdir()) == []
        (Path(partial) / "new.txt").write_text("new")
    assert sorted(p.name for p in folder.iterdir()) == ["new.txt"]
    assert not (tmp_path / "pipeline.partial").exists()
