"""`durable.atomic_write` and `durable.rename_into_place`: content lands whole or not at all, no debris
is left behind, permissions hold from creation, and what must reach the disk is fsynced."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from fedem_flwr import durable
from fedem_flwr.durable import atomic_write, rename_into_place


class Boom(Exception):
    """Stands for any failure in the middle of a write."""


@pytest.fixture
def synced(monkeypatch) -> list[Path]:
    """The paths fsynced from now on, in order (read back from each descriptor)."""
    seen: list[Path] = []
    real = os.fsync

    def record(fd: int) -> None:
        seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))  # Linux: the path behind the descriptor
        real(fd)

    monkeypatch.setattr(durable.os, "fsync", record)
    return seen


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_the_content_replaces_the_file_and_no_temporary_is_left(tmp_path):
    (tmp_path / "refs.json").write_text("old")

    with atomic_write(tmp_path / "refs.json", "w") as out:
        json.dump({"main": "v1"}, out)
    with atomic_write(tmp_path / "blob.bin") as out:
        out.write(b"\x00\x01")

    assert json.loads((tmp_path / "refs.json").read_text()) == {"main": "v1"}
    assert (tmp_path / "blob.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "refs.json"]


def test_the_file_and_then_its_folder_are_fsynced(tmp_path, synced):
    tmp_path = tmp_path.resolve()
    with atomic_write(tmp_path / "state.json") as out:
        out.write(b"{}")

    assert len(synced) == 2
    assert synced[0].parent == tmp_path and synced[0].name.startswith(".state.json.")  # before the rename
    assert synced[1] == tmp_path


def test_an_error_mid_write_keeps_the_old_content_and_leaves_no_debris(tmp_path):
    (tmp_path / "state.json").write_text("old")

    with pytest.raises(Boom):
        with atomic_write(tmp_path / "state.json", "w") as out:
            out.write("half of the new")
            raise Boom

    assert (tmp_path / "state.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_rename_keeps_the_old_content_and_leaves_no_debris(tmp_path, monkeypatch):
    (tmp_path / "state.json").write_text("old")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable.os, "replace", refuse)
    with pytest.raises(OSError, match="No space"):
        with atomic_write(tmp_path / "state.json", "w") as out:
            out.write("new")

    assert (tmp_path / "state.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_permissions_hold_from_creation_and_default_to_the_umask(tmp_path, umask_022, monkeypatch):
    modes = []
    real_open = os.open

    def watch(path, flags, mode=0o777, *args, **kwargs):
        modes.append(mode)
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(durable.os, "open", watch)
    with atomic_write(tmp_path / "server.key", permissions=0o600) as out:
        out.write(b"secret")
    with atomic_write(tmp_path / "result.json", "w") as out:
        out.write("{}")

    assert stat.S_IMODE((tmp_path / "server.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "result.json").stat().st_mode) == 0o644
    assert modes[0] == 0o600  # created private, never chmod-ed afterwards


def test_without_overwrite_the_first_writer_wins(tmp_path):
    with atomic_write(tmp_path / "secret", "w", overwrite=False) as out:
        out.write("first")

    with pytest.raises(FileExistsError):
        with atomic_write(tmp_path / "secret", "w", overwrite=False) as out:
            out.write("second")

    assert (tmp_path / "secret").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]


def test_a_mode_other_than_w_or_wb_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="`mode` is 'a'"):
        with atomic_write(tmp_path / "log", "a"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_a_folder_is_fsynced_whole_before_it_is_renamed_into_place(tmp_path, synced):
    tmp_path = tmp_path.resolve()
    (tmp_path / ".tmp" / "put" / "sub").mkdir(parents=True)
    (tmp_path / ".tmp" / "put" / "config.json").write_text("{}")
    (tmp_path / ".tmp" / "put" / "sub" / "weights.bin").write_bytes(b"w")
    (tmp_path / "repo").mkdir()

    rename_into_place(tmp_path / ".tmp" / "put", tmp_path / "repo" / "v1")

    assert not (tmp_path / ".tmp" / "put").exists()
    assert (tmp_path / "repo" / "v1" / "sub" / "weights.bin").read_bytes() == b"w"
    staged = tmp_path / ".tmp" / "put"
    assert set(synced[:-2]) == {staged, staged / "config.json", staged / "sub", staged / "sub" / "weights.bin"}
    assert synced[-2:] == [tmp_path / "repo", tmp_path / ".tmp"]  # both folders whose listing changed


def test_a_folder_is_not_renamed_over_a_non_empty_one(tmp_path):
    (tmp_path / "incoming").mkdir()
    (tmp_path / "incoming" / "a").write_text("new")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a").write_text("cached")

    with pytest.raises(OSError):
        rename_into_place(tmp_path / "incoming", tmp_path / "base")

    assert (tmp_path / "base" / "a").read_text() == "cached"
    assert (tmp_path / "incoming" / "a").read_text() == "new"
