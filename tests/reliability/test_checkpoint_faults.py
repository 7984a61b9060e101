"""Damaged checkpoints are refused on load, on every rank alike, naming the damaged file.

Each fault of ``workers.CORRUPTIONS`` (a flipped byte or 64 in a weight/optimizer shard,
a truncated or zero-filled shard, a truncated ``.metadata``, a missing shard or
manifest, ...) is applied to a copy of one checkpoint saved by ``train_gpt.py`` on 2
gloo ranks, and the resume must raise ``CheckpointError`` before any state is read.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from autopar.emit.manifest import FileRecord, Manifest, file_record, latest_checkpoint, verify_files
from autopar.errors import CheckpointError
from tests.emit.harness import run_spmd
from tests.reliability.workers import CORRUPTIONS

pytestmark = pytest.mark.multiproc


def test_every_damaged_checkpoint_is_refused_naming_the_file(tmp_path: Path) -> None:
    by_rank = run_spmd("tests.reliability.workers:check_corrupt_checkpoints", 2, str(tmp_path))
    assert by_rank[0] == by_rank[1]  # the ranks agree, so rank 0 alone need report it
    for name, (file, _) in CORRUPTIONS.items():
        message = by_rank[0][name]
        assert message != "accepted", name
        assert file in message and str(tmp_path) in message, (name, message)
        assert "weights_only" not in message and "Traceback" not in message and "\n" not in message


def test_verify_files_names_the_fault(tmp_path: Path) -> None:
    shard = tmp_path / "__0_0.distcp"
    shard.write_bytes(b"abcdefgh")
    manifest = Manifest(files={"__0_0.distcp": file_record(shard)}, world_size=1, layout="dp1")
    assert verify_files(tmp_path, manifest, ["__0_0.distcp"]) is None
    shard.write_bytes(b"abcd")
    assert "is truncated (4 bytes, 8 saved)" in verify_files(tmp_path, manifest, ["__0_0.distcp"])
    shard.write_bytes(b"abcdefgh!")
    assert "longer than when it was saved" in verify_files(tmp_path, manifest, ["__0_0.distcp"])
    shard.write_bytes(b"abcdefgX")
    assert "is corrupt" in verify_files(tmp_path, manifest, ["__0_0.distcp"])
    shard.unlink()
    assert "is missing" in verify_files(tmp_path, manifest, ["__0_0.distcp"])


def test_latest_checkpoint_skips_unfinished_ones(tmp_path: Path) -> None:
    record = FileRecord(size_bytes=0, sha256="e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    for name in ("step_00000002", "step_00000004", "step_00000006.partial"):
        (tmp_path / name).mkdir()
    for name in ("step_00000002", "step_00000004"):
        (tmp_path / name / "autopar_manifest.json").write_text(
            Manifest(files={"x": record}, world_size=1, layout="dp1").to_json())
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    with pytest.raises(CheckpointError, match="no finished checkpoint"):
        latest_checkpoint(tmp_path / "step_00000006.partial")
