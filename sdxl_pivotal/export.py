"""Write outputs atomically, and keep the folders we write in tidy (the file formats themselves: `formats/`).

Every file or folder is written under a hidden temporary name beside its target,
`.<name>.partial-<pid>-<random>`, flushed to disk (fsync of the files and of their folder) and then renamed
over the target: a crash leaves the old version or the new one, never half of one. A write that fails (a
full disk, a read-only folder) raises `WriteError`, naming the path and the reason.

The run's final files are written as one set (`final_output_set`), and a run starts by removing the
temporaries that killed runs left behind (`remove_temporaries`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError, WriteError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# The staging folder of the final output set, and the file that marks it complete (written last).
FINAL_SET_NAME = "final-output"
SET_COMPLETE_MARKER = "complete"
# Hidden temporaries of ours, current and earlier forms:
#   .<target>.partial-<pid>-<random>   files and folders being written (earlier: without <pid>)
#   .<target>.old-<pid>-<random>       a folder's previous version while the new one is renamed in
#   .write-<random>                    files being written, by earlier versions
#   .<image>.<pid>.partial             class images being written, by earlier versions
TEMPORARY_PATTERN = re.compile(
    r"^\.(?:write-\w+"
    r"|(?P<target>.+)\.(?P<kind>partial|old)-(?:(?P<pid>\d+)-)?\w+"
    r"|.+\.(?P<image_pid>\d+)\.partial)$"
)


def output_name(output_dir: str | Path) -> str:
    """The run's name for its files: the output folder's last component ("runs/tok-dog" -> "tok-dog")."""
    return Path(output_dir).resolve().name


def embeddings_file_name(output_dir: str | Path) -> str:
    return f"{output_name(output_dir)}_emb.safetensors"


def _temporary(target: Path, kind: str = "partial") -> Path:
    """A fresh hidden folder beside `target`, named as TEMPORARY_PATTERN recognises."""
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{os.getpid()}-", dir=target.parent))


def write_failure_reason(error: Exception) -> str:
    """The operating system's words for a failed write (safetensors reports them inside a Rust error)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    code = re.search(r"code: (\d+)", str(error))
    return os.strerror(int(code.group(1))) if code else str(error)


def _write_hint(error: Exception) -> str:
    code = error.errno if isinstance(error, OSError) else None
    if code is None and (match := re.search(r"code: (\d+)", str(error))):
        code = int(match.group(1))
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "Free some disk space (or pass another --output_dir)."
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "The folder is not writable: fix its permissions or choose another folder."
    return "Check the disk and the folder's permissions."


@contextlib.contextmanager
def write_errors(target: Path) -> Iterator[None]:
    """Turn a failed write of `target` (an OSError, or safetensors' SafetensorError for an I/O error) into
    one WriteError."""
    from safetensors import SafetensorError

    try:
        yield
    except WriteError:
        raise
    except (OSError, SafetensorError) as error:
        if isinstance(error, SafetensorError) and "IoError" not in str(error):
            raise  # not the disk: e.g. tensors that share memory, a bug
        raise WriteError(f"Cannot write {target}: {write_failure_reason(error)}. {_write_hint(error)}") from error


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (POSIX only: Windows cannot open folders), to the disk."""
    if path.is_dir() and os.name != "posix":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sync_tree(path: Path) -> None:
    """Give `path` (and a folder's contents) the permissions of a normally created file, then flush it.

    Temporary files are private (0600/0700), but outputs must be readable by the user's other tools."""
    umask = os.umask(0)
    os.umask(umask)
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in reversed(items):  # contents before their folder
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)
        _fsync(item)


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `target`; on success it replaces `target` in one rename."""
    with write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = _temporary(target)
        try:
            yield staging
            _sync_tree(staging)
            if target.exists():
                trash = _temporary(target, "old")
                os.replace(target, trash / target.name)
                os.replace(staging, target)
                shutil.rmtree(trash)
            else:
                os.replace(staging, target)
            _fsync(target.parent)
        finally:
            if staging.exists():
                shutil.rmtree(staging)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path (with `path`'s name, in a temporary folder beside it); once the caller has
    written it, it replaces `path`."""
    with write_errors(path):
        staging = _temporary(path)
        try:
            temporary = staging / path.name
            yield temporary
            _sync_tree(temporary)
            os.replace(temporary, path)
            _fsync(path.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    from .safetensors_order import sort_metadata

    with atomic_path(path) as temporary:
        save_file(tensors, temporary, metadata=metadata)
        sort_metadata(temporary)
    return path


def save_text(text: str, path: Path) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path


def save_image(image, path: Path) -> Path:
    """Save a PIL image as PNG."""
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")
    return path


# ------------------------------------------------------------------------------------------ the output folder


def check_writable(folder: Path, flag: str) -> None:
    """Create `folder` if needed and write (then remove) a probe file in it; raise InputError if either
    fails, so a read-only folder is found before training rather than after it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(prefix=f".write-probe.partial-{os.getpid()}-", dir=folder)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        raise InputError(
            f"{flag} {folder} is not writable ({write_failure_reason(error)}). {_write_hint(error)}"
        ) from error


@contextlib.contextmanager
def final_output_set(output_dir: Path) -> Iterator[Path]:
    """Yield a staging folder, named as `output_dir`, for the run's final files (LoRA, embeddings, kohya
    file, card, final validation images); once all are written, move them into `output_dir`.

    The set is complete or recognisably incomplete: the diffusers LoRA file is removed from `output_dir`
    before the first file moves in and moved in last, and a kill while moving leaves the complete set
    marked in its staging folder, which the next run's `remove_temporaries` moves in.
    """
    with write_errors(output_dir):
        holder = _temporary(output_dir / FINAL_SET_NAME)
        staging = holder / output_name(output_dir)
        staging.mkdir()
    try:
        yield staging  # the writes inside report their own failures; other errors keep their own type
        with write_errors(output_dir):
            _sync_tree(holder)
            (holder / SET_COMPLETE_MARKER).touch()
            _fsync(holder)
    except BaseException:
        shutil.rmtree(holder, ignore_errors=True)
        raise
    with write_errors(output_dir):
        move_output_set(holder, output_dir)


def move_output_set(holder: Path, output_dir: Path) -> None:
    """Move a complete staged set into `output_dir`: files replace files; a staged folder of files replaces
    its folder (validation/final), a staged folder of folders is merged (validation). The LoRA file last."""
    staging = holder / output_name(output_dir)
    if (staging / LORA_WEIGHTS_NAME).exists():  # else it was moved in already, by a run killed afterwards
        (output_dir / LORA_WEIGHTS_NAME).unlink(missing_ok=True)
    entries = sorted(staging.iterdir(), key=lambda p: p.name == LORA_WEIGHTS_NAME)
    for entry in entries:
        _move_entry(entry, output_dir / entry.name)
    _fsync(output_dir)
    shutil.rmtree(holder)


def _move_entry(source: Path, target: Path) -> None:
    if source.is_dir() and not any(source.iterdir()):
        return  # its contents were moved in already, by a run killed afterwards
    if source.is_dir() and any(child.is_dir() for child in source.iterdir()):
        target.mkdir(exist_ok=True)
        for child in source.iterdir():
            _move_entry(child, target / child.name)
        return
    if source.is_dir() and target.is_dir():
        shutil.rmtree(target)
    os.replace(source, target)


def _is_running(pid: int) -> bool:
    """Whether process `pid` runs on this machine (then its temporaries are in use); not asked on Windows,
    where os.kill would end it."""
    if os.name != "posix":
        return True
    if pid == os.getpid():  # an earlier process with our number: we have written nothing yet
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_temporaries(folder: Path) -> None:
    """Remove the hidden temporaries of ours (TEMPORARY_PATTERN) that killed runs left directly in `folder`,
    and finish what they had completed: a complete final output set is moved in, a folder caught between its
    old and new version gets its old one back. Temporaries of a process still running here are kept; nothing
    else is touched."""
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        match = TEMPORARY_PATTERN.match(path.name)
        if match is None:
            continue
        pid = match.group("pid") or match.group("image_pid")
        if pid is not None and _is_running(int(pid)):
            continue
        kind, target = match.group("kind"), folder / (match.group("target") or "")
        if kind == "partial" and target.name == FINAL_SET_NAME and (path / SET_COMPLETE_MARKER).exists():
            logger.warning("Moving in the final output an interrupted run had completed (%s).", path)
            move_output_set(path, folder)
            continue
        if kind == "old" and not target.exists() and (path / target.name).exists():
            logger.warning("Restoring %s, interrupted while being replaced.", target)
            os.replace(path / target.name, target)
        logger.warning("Removing %s, left by an interrupted run.", path)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
