"""The one atomic writer: files flushed and renamed into place, failures as one clear error; the final output
written as a set; the temporaries of killed runs removed (and only those)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sdxl_pivotal import export
from sdxl_pivotal.errors import InputError, WriteError
from sdxl_pivotal.export import (
    LORA_WEIGHTS_NAME,
    atomic_folder,
    check_writable,
    final_output_set,
    remove_temporaries,
    save_safetensors,
    save_text,
)


class Interrupted(Exception):
    """Stands for a kill."""


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_files_are_flushed_to_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        export.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd)
    )
    path = save_safetensors({"w": torch.ones(3)}, tmp_path / "a.safetensors")
    assert torch.equal(load_file(path)["w"], torch.ones(3))
    assert any(s.endswith("/a.safetensors") and "/.a.safetensors.partial-" in s for s in synced), synced
    assert synced[-1] == str(tmp_path), "the folder's entry (the rename) is flushed last"
    assert hidden(tmp_path) == []


def test_a_folder_is_flushed_whole(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        export.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd)
    )
    with atomic_folder(tmp_path / "checkpoint-1") as staging:
        (staging / "state.json").write_text("{}")
    assert (tmp_path / "checkpoint-1" / "state.json").read_text() == "{}"
    assert any(s.endswith("/state.json") for s in synced) and synced[-1] == str(tmp_path)


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        # what safetensors' Rust writer raises on a full disk
        SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        ),
    ],
)
def test_a_full_disk_is_one_clear_error_and_keeps_the_old_file(tmp_path, monkeypatch, error):
    path = save_text("old", tmp_path / "card.md")

    def full_disk(*args, **kwargs):
        raise error

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    target = tmp_path / "card.md"
    with pytest.raises(WriteError) as raised, export.atomic_path(target) as temporary:
        temporary.write_text("new, half")
        full_disk()
    message = str(raised.value)
    assert f"Cannot write {target}: No space left on device. Free some disk space" in message
    assert "\n" not in message and isinstance(raised.value, InputError)  # the command line prints it as one line
    assert path.read_text() == "old" and hidden(tmp_path) == []
    with pytest.raises(WriteError, match="No space left on device"):
        save_safetensors({"w": torch.ones(1)}, tmp_path / "w.safetensors")
    assert hidden(tmp_path) == []


def test_a_read_only_folder_is_found_by_the_check(read_only_folder):
    with pytest.raises(InputError, match=rf"--output_dir {read_only_folder} is not writable \(.*\)\. .*not writable"):
        check_writable(read_only_folder, "--output_dir")
    with pytest.raises(InputError, match=r"--output_dir .*/new is not writable"):
        check_writable(read_only_folder / "new", "--output_dir")
    check_writable(read_only_folder.parent / "writable" / "deep", "--output_dir")
    assert (read_only_folder.parent / "writable" / "deep").is_dir()
    assert hidden(read_only_folder.parent / "writable" / "deep") == []


# Above Linux's PID_MAX_LIMIT (2**22): no running process has it.
NO_SUCH_PID = 2**22 + 1


def write_set(staging: Path, lora: str = "new") -> None:
    save_text(lora, staging / LORA_WEIGHTS_NAME)
    save_text("kohya", staging / "run.safetensors")
    save_text("card", staging / "README.md")
    (staging / "validation" / "final").mkdir(parents=True)
    save_text("png", staging / "validation" / "final" / "0.png")


def test_final_set_moves_in_whole(tmp_path):
    out = tmp_path / "run"
    (out / "validation" / "step-5").mkdir(parents=True)
    (out / "validation" / "final").mkdir()
    (out / "validation" / "final" / "3.png").write_text("stale image of the last run")
    (out / "notes.txt").write_text("the user's")
    with final_output_set(out) as staging:
        assert staging.name == "run"  # files named after the output folder keep their names
        write_set(staging)
    assert (out / LORA_WEIGHTS_NAME).read_text() == "new" and (out / "README.md").read_text() == "card"
    assert sorted(p.name for p in (out / "validation" / "final").iterdir()) == ["0.png"]
    assert (out / "validation" / "step-5").is_dir() and (out / "notes.txt").read_text() == "the user's"
    assert hidden(out) == []


def test_a_failure_before_the_set_is_complete_leaves_it_recognisably_unfinished(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LORA_WEIGHTS_NAME).write_text("an earlier step's")
    with pytest.raises(Interrupted), final_output_set(out) as staging:
        write_set(staging)
        raise Interrupted("killed during the final validation")
    assert (out / LORA_WEIGHTS_NAME).read_text() == "an earlier step's", "nothing moved in"
    assert not (out / "README.md").exists() and hidden(out) == []


def test_a_kill_while_moving_the_set_in_is_finished_by_the_next_run(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / LORA_WEIGHTS_NAME).write_text("an earlier run's")
    real_move = export._move_entry

    def killed_at_the_lora(source, target):
        if source.name == LORA_WEIGHTS_NAME:
            raise Interrupted("killed")
        real_move(source, target)

    monkeypatch.setattr(export, "_move_entry", killed_at_the_lora)
    with pytest.raises(Interrupted), final_output_set(out) as staging:
        write_set(staging)
    monkeypatch.undo()
    # Recognisably incomplete: no LoRA file (the earlier one went first), the rest of the set is in.
    assert not (out / LORA_WEIGHTS_NAME).exists() and (out / "README.md").read_text() == "card"
    assert len(hidden(out)) == 1
    remove_temporaries(out)
    assert (out / LORA_WEIGHTS_NAME).read_text() == "new" and (out / "run.safetensors").read_text() == "kohya"
    assert hidden(out) == []


def test_a_kill_after_the_set_moved_in_loses_nothing(tmp_path):
    """Killed after the last move, before the staging folder was removed: the next run only removes it."""
    out = tmp_path / "run"
    (out / "validation" / "step-1").mkdir(parents=True)
    (out / "validation" / "final").mkdir()
    (out / "validation" / "final" / "0.png").write_text("png")
    (out / LORA_WEIGHTS_NAME).write_text("new")
    holder = out / f".{export.FINAL_SET_NAME}.partial-{NO_SUCH_PID}-ab"
    (holder / "run" / "validation").mkdir(parents=True)  # what moving in leaves: empty folders
    (holder / export.SET_COMPLETE_MARKER).touch()
    remove_temporaries(out)
    assert (out / LORA_WEIGHTS_NAME).read_text() == "new" and (out / "validation" / "final" / "0.png").exists()
    assert (out / "validation" / "step-1").is_dir() and hidden(out) == []


def test_only_our_temporaries_of_dead_processes_are_removed(tmp_path):
    dead, alive = NO_SUCH_PID, os.getppid()
    our_folders = [
        f".pytorch_lora_weights.safetensors.partial-{dead}-x1y2",  # a file being written (in its folder)
        f".checkpoint-4.partial-{dead}-ab_c",  # a checkpoint being written
        ".checkpoint-4.partial-k3j2",  # the same, by earlier versions
        ".write-ab12cd",  # atomic files of earlier versions
    ]
    our_files = [f".class-0a1b2c3d4e-00003.png.{dead}.partial"]  # class images of earlier versions
    other_folders = [f".checkpoint-6.partial-{alive}-qq", ".git", "checkpoint-2"]  # the first: in use
    other_files = [".my-notes.partial", "photo.partial", ".write-notes.txt"]
    for name in our_folders + other_folders:
        (tmp_path / name).mkdir()
        (tmp_path / name / "optimizer.safetensors").write_text("half")
    for name in our_files + other_files:
        (tmp_path / name).write_text("x")
    remove_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(other_folders + other_files)


def test_a_folder_caught_between_versions_gets_its_old_one_back(tmp_path):
    dead = NO_SUCH_PID
    trash = tmp_path / f".checkpoint-4.old-{dead}-zz"
    (trash / "checkpoint-4").mkdir(parents=True)
    (trash / "checkpoint-4" / "training_state.json").write_text("{}")
    remove_temporaries(tmp_path)
    assert (tmp_path / "checkpoint-4" / "training_state.json").read_text() == "{}" and hidden(tmp_path) == []
