"""lungcbir.fileutils: the one atomic-write helper, used by the index and by model weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lungcbir import fileutils


def test_a_write_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(fileutils.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(fileutils.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    fileutils.write_atomically(tmp_path / "x.bin", lambda path: Path(path).write_bytes(b"abc"))
    assert events == ["fsync", "replace"] and (tmp_path / "x.bin").read_bytes() == b"abc"


def test_weights_are_saved_through_the_helper_and_a_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    """save_weights used a fixed ``.tmp`` name and no fsync; a failed save left the ``.tmp`` behind."""
    import torch

    from lungcbir.inference import ModelSettings, save_weights
    from lungcbir.model import UNet, UNetConfig

    config = UNetConfig(base_channels=4, depth=3)
    target = tmp_path / "w.pt"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(fileutils.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    save_weights(target, UNet(config), ModelSettings(unet=config))
    assert synced, "weights were not fsynced"
    before = target.read_bytes()

    def broken_save(payload, path):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_weights(target, UNet(config), ModelSettings(unet=config))
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]
