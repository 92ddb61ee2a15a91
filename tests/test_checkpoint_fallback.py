"""A damaged newest checkpoint slot falls back to the older one (two are kept), with a warning; no intact
slot is one clear error naming each slot's problem; a disk task store rolls back through two undo-log
generations to reach the older slot, and refuses a rollback whose logs are gone."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from bora_pyro.inference.checkpoint import KEEP_SLOTS, LoopState, checkpoint_step, load_checkpoint, save_checkpoint
from bora_pyro.io.integrity import CorruptFile
from bora_pyro.io.task_store import TaskStore

FINGERPRINT = {"run": 1}


def flip_a_byte(slot: Path) -> str:
    raw = bytearray((slot / "state.safetensors").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (slot / "state.safetensors").write_bytes(bytes(raw))
    return "state.safetensors does not match its checksum"


def delete_state_json(slot: Path) -> str:
    (slot / "state.json").unlink()
    return "state.json is missing"


def truncate_state_json(slot: Path) -> str:
    text = (slot / "state.json").read_text()
    (slot / "state.json").write_text(text[: len(text) // 2])
    return "state.json is not readable JSON"


def drop_sha256(slot: Path) -> str:
    meta = json.loads((slot / "state.json").read_text())
    del meta["sha256"]
    (slot / "state.json").write_text(json.dumps(meta))
    return "state.json has no 'sha256'"


def change_a_field(slot: Path) -> str:
    meta = json.loads((slot / "state.json").read_text())
    meta["loop"]["step"] += 1  # valid JSON, another value: only its own digest tells
    (slot / "state.json").write_text(json.dumps(meta))
    return "state.json does not match its checksum"


def wrong_format(slot: Path) -> str:
    meta = json.loads((slot / "state.json").read_text())
    meta["format"] = "bora_pyro.checkpoint/2"
    (slot / "state.json").write_text(json.dumps(meta))
    return "its format is 'bora_pyro.checkpoint/2'"


DAMAGES = [flip_a_byte, delete_state_json, truncate_state_json, drop_sha256, change_a_field, wrong_format]


def saved(folder: Path, steps: tuple[int, ...]) -> list[Path]:
    """Checkpoints saved at ``steps``; returns the slots kept, newest first."""
    for step in steps:
        save_checkpoint(folder, None, LoopState(step=step), {"x": torch.full((3,), float(step))}, FINGERPRINT)
    return sorted(folder.glob("step-*"), reverse=True)


def test_the_two_newest_slots_are_kept(tmp_path):
    slots = saved(tmp_path / "ckpt", (4, 8, 12))
    assert KEEP_SLOTS == 2 and [s.name.split("-")[1] for s in slots] == ["00000012", "00000008"]
    assert checkpoint_step(tmp_path / "ckpt") == 12
    state, best = load_checkpoint(tmp_path / "ckpt", None, FINGERPRINT)
    assert state.step == 12 and torch.equal(best["x"], torch.full((3,), 12.0))


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_slot_falls_back_to_the_older_one_and_says_so(tmp_path, caplog, damage):
    folder = tmp_path / "ckpt"
    newest, older = saved(folder, (4, 8, 12))
    why = damage(newest)
    assert checkpoint_step(folder) == 8
    with caplog.at_level(logging.WARNING):
        state, best = load_checkpoint(folder, None, FINGERPRINT)
    assert state.step == 8 and torch.equal(best["x"], torch.full((3,), 8.0))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(newest) in warning and why in warning and f"older slot {older.name} at step 8" in warning
    assert not newest.exists()  # deleted: a slot saved from here on must rank above it
    assert [s.name for s in saved(folder, (12,))][1] == older.name


def test_no_intact_slot_is_one_error_naming_the_folder_and_each_slots_problem(tmp_path):
    folder = tmp_path / "ckpt"
    newest, older = saved(folder, (4, 8, 12))
    whys = [flip_a_byte(newest), drop_sha256(older)]
    for call in (lambda: checkpoint_step(folder), lambda: load_checkpoint(folder, None, FINGERPRINT)):
        with pytest.raises(CorruptFile) as raised:
            call()
        message = str(raised.value)
        assert f"no intact checkpoint in {folder}" in message and "\n" not in message
        assert f"{newest.name}: {whys[0]}" in message and f"{older.name}: {whys[1]}" in message
    assert newest.exists() and older.exists()  # nothing deleted when nothing is resumed


def test_a_different_run_is_refused_not_fallen_back_from(tmp_path):
    folder = tmp_path / "ckpt"
    saved(folder, (4, 8))
    with pytest.raises(ValueError, match="belongs to a different run: run differs"):
        load_checkpoint(folder, None, {"run": 2})
    assert len(list(folder.glob("step-*"))) == 2


def table_checkpoint(store: TaskStore, table: torch.Tensor, value: float, rows: list[int]) -> torch.Tensor:
    """Write ``value`` into ``rows`` as a step would (journaled first), then checkpoint: flush and start the
    next generation. Returns the table as of that checkpoint."""
    store.before_write(torch.tensor(rows))
    table[rows] = value
    store.flush()
    store.begin(store.generation + 1)
    return table.clone()


def test_a_disk_store_rolls_back_through_two_generations(tmp_path):
    store = TaskStore("disk", tmp_path)
    table = store.table("guide.t", (6, 2))
    store.begin(0)
    at = [table_checkpoint(store, table, 1.0, [0, 1]), table_checkpoint(store, table, 2.0, [1, 2])]
    assert sorted(p.name for p in tmp_path.glob("undo-*.log")) == ["undo-1.log", "undo-2.log"]
    store.before_write(torch.tensor([2, 3]))
    table[[2, 3]] = 3.0  # after the second checkpoint, then a kill
    store.table("guide.new", (6, 2))  # a table created since, with rows written
    store.before_write(torch.tensor([4]))
    store.tables["guide.new"][4] = 5.0
    store.close()
    store.rollback(1)
    assert torch.equal(table, at[0]) and "guide.new" not in store.tables and not store.path("guide.new").exists()
    store.rollback(1)  # again, as after a kill inside the first rollback: the same state
    assert torch.equal(table, at[0])
    store.begin(1)  # the newer log is spent: only this generation's, empty, is left
    assert [p.name for p in tmp_path.glob("undo-*.log")] == ["undo-1.log"]
    assert (tmp_path / "undo-1.log").stat().st_size == 0


def test_a_rollback_whose_undo_log_is_gone_is_refused(tmp_path):
    store = TaskStore("disk", tmp_path)
    table = store.table("guide.t", (4, 2))
    store.begin(0)
    for value in (1.0, 2.0, 3.0):
        table_checkpoint(store, table, value, [0])
    assert store.missing_logs(3) == [] and store.missing_logs(2) == []
    assert store.missing_logs(1) == [tmp_path / "undo-1.log"]
    assert store.missing_logs(4) == []  # newer than every log: the tables are that checkpoint's
    with pytest.raises(CorruptFile, match=r"back to checkpoint generation 1: undo-1.log is gone"):
        store.rollback(1)
