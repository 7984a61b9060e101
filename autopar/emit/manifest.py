"""A checkpoint directory that verifies itself: per-file checksums, published by a rename.

``save_checkpoint`` writes into ``NAME.partial/`` and renames it to ``NAME`` only after
every shard is on disk and rank 0 has written ``autopar_manifest.json``: the size and
SHA-256 of every file, the run's position (step, samples consumed, ...) and the layout
it was saved under. A job killed while saving leaves ``NAME.partial`` (ignored) and the
previous checkpoint intact. On load the files are checked against the manifest before
``torch.distributed.checkpoint`` reads any of them, so a flipped byte, a truncated or
zero-filled shard, or a missing file ends the job with one error naming the file.

This module touches only files; the collective parts live in ``autopar.emit.checkpoint``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autopar._io import TEMP_PREFIX, write_atomic
from autopar.errors import CheckpointError

MANIFEST_NAME = "autopar_manifest.json"
"""The manifest's file name inside a checkpoint directory."""
MANIFEST_FORMAT = "autopar-checkpoint/1"
"""Format tag of the manifest; another tag is refused."""
STAGING_SUFFIX = ".partial"
"""Suffix of a checkpoint directory still being written."""
HASH_CHUNK_BYTES = 4 << 20
"""Bytes read at a time while hashing a shard."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FileRecord:
    """Size and checksum of one checkpoint file."""

    size_bytes: int
    """File size."""
    sha256: str
    """Hex SHA-256 of the content."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """What ``autopar_manifest.json`` records."""

    files: Mapping[str, FileRecord]
    """File name (relative to the directory) → record, for every file but the manifest."""
    world_size: int
    """Ranks of the job that saved it."""
    layout: str
    """``Layout.describe()`` of the plan it was saved under (for messages)."""
    train_state: Mapping[str, Any] = field(default_factory=dict)
    """The caller's JSON-able run position: step, samples consumed, global batch, ..."""

    def to_json(self) -> str:
        """The manifest file's text."""
        files = {name: {"size_bytes": r.size_bytes, "sha256": r.sha256} for name, r in sorted(self.files.items())}
        return json.dumps({"format": MANIFEST_FORMAT, "world_size": self.world_size, "layout": self.layout,
                           "train_state": dict(self.train_state), "files": files}, indent=1) + "\n"


def file_record(path: Path) -> FileRecord:
    """Size and SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return FileRecord(size_bytes=path.stat().st_size, sha256=digest.hexdigest())


def data_files(directory: Path) -> list[str]:
    """Names of the files a checkpoint holds (the manifest and temporary files excepted), sorted."""
    return sorted(p.name for p in directory.iterdir()
                  if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(TEMP_PREFIX))


def staging_dir(final: Path) -> Path:
    """Where a checkpoint bound for ``final`` is written before it is published."""
    return final.with_name(final.name + STAGING_SUFFIX)


def prepare_staging(final: Path) -> Path:
    """An empty staging directory for ``final`` (an older attempt's is removed)."""
    staging = staging_dir(final)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, manifest: Manifest, final: Path) -> None:
    """Write the manifest into ``staging`` and rename it to ``final`` (replacing an older checkpoint)."""
    write_atomic(staging / MANIFEST_NAME, manifest.to_json())
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staging, final)
    if old.exists():
        shutil.rmtree(old)


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of a published checkpoint.

    Raises:
        CheckpointError: No such directory, no manifest (unfinished or not autopar's), or a
            manifest that does not parse.
    """
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (or is not a directory)")
    file = path / MANIFEST_NAME
    if not file.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no {MANIFEST_NAME}: it was not finished (the job "
                              f"stopped while saving) or not written by autopar; resume from another checkpoint")
    try:
        data = json.loads(file.read_text())
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        files = {str(n): FileRecord(size_bytes=int(r["size_bytes"]), sha256=str(r["sha256"]))
                 for n, r in data["files"].items()}
        return Manifest(files=files, world_size=int(data["world_size"]), layout=str(data["layout"]),
                        train_state=dict(data.get("train_state", {})))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint manifest {str(file)!r} is corrupt ({e}); resume from another "
                              f"checkpoint") from e


def verify_files(directory: Path, manifest: Manifest, names: Sequence[str]) -> str | None:
    """The first problem with ``names`` (missing, truncated, grown, corrupt), or None if they match.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "a").write_bytes(b"xyz")
        >>> m = Manifest(files={"a": file_record(d / "a")}, world_size=1, layout="dp1")
        >>> verify_files(d, m, ["a"]) is None
        True
        >>> _ = (d / "a").write_bytes(b"xyZ"); "is corrupt" in verify_files(d, m, ["a"])
        True
    """
    for name in names:
        path, expected = directory / name, manifest.files[name]
        if not path.is_file():
            return f"checkpoint file {str(path)!r} is missing; restore it or resume from another checkpoint"
        size = path.stat().st_size
        if size != expected.size_bytes:
            state = "truncated" if size < expected.size_bytes else "longer than when it was saved"
            return (f"checkpoint file {str(path)!r} is {state} ({size} bytes, {expected.size_bytes} saved); "
                    f"restore it or resume from another checkpoint")
        actual = file_record(path).sha256
        if actual != expected.sha256:
            return (f"checkpoint file {str(path)!r} is corrupt (sha256 {actual[:16]}…, {expected.sha256[:16]}… "
                    f"saved); restore it or resume from another checkpoint")
    return None


def latest_checkpoint(root: str | Path) -> Path:
    """``root`` if it is a published checkpoint, else its newest published sub-checkpoint (by name).

    Raises:
        CheckpointError: Neither ``root`` nor any directory in it holds a manifest.
    """
    path = Path(root)
    if (path / MANIFEST_NAME).is_file():
        return path
    found = sorted(p for p in path.iterdir() if (p / MANIFEST_NAME).is_file()
                   and not p.name.endswith((STAGING_SUFFIX, ".old"))) if path.is_dir() else []
    if not found:
        raise CheckpointError(f"no finished checkpoint in {str(path)!r} (none holds {MANIFEST_NAME})")
    return found[-1]


__all__ = ["MANIFEST_NAME", "FileRecord", "Manifest", "data_files", "file_record", "latest_checkpoint",
           "prepare_staging", "publish", "read_manifest", "staging_dir", "verify_files"]
