"""Writing files so that a kill at any moment leaves the old version or the new one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMPORARY_PREFIX = ".tmp-"


def write_json_atomically(path: Path, payload: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    temporary = path.with_name(f"{TEMPORARY_PREFIX}{path.name}.{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def remove_stale_temporaries(stage_dir: Path) -> None:
    """Remove half-written directories left by a process killed mid-save."""
    stage_dir = Path(stage_dir)
    if stage_dir.is_dir():
        for path in stage_dir.iterdir():
            if path.name.startswith(TEMPORARY_PREFIX):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


class OutputWriteError(OSError):
    """The run directory could not be written (disk full, read-only): nothing half-written is left behind."""


@contextlib.contextmanager
def atomic_directory(destination: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `destination`; on success rename it into place, else delete it."""
    destination = Path(destination)
    temporary = destination.with_name(f"{TEMPORARY_PREFIX}{destination.name}")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        yield temporary
        fsync_tree(temporary)
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(temporary, destination)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, OutputWriteError):
            raise
        raise OutputWriteError(f"could not write {destination}: {error.strerror or error}; the previous "
                               f"checkpoints are intact (free space or fix permissions, then resume)") from None
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def fsync_tree(root: Path) -> None:
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
