"""Where the hub lives (explicit > $FEDEM_HUB > per-user default) and its single-writer lock."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fedem_flwr.config.loader import load_config, load_run_config
from fedem_flwr.errors import ConfigError, HubLocked, HubNotFound
from fedem_flwr.hub.paths import (
    HubWriterLock,
    default_hub_path,
    read_lock_holder,
    require_hub,
    resolve_hub_path,
)
from fedem_flwr.hub.pseudonym import load_or_create_secret
from fedem_flwr.hub.registry import Registry
from fedem_flwr.pids import pid_alive


def test_explicit_beats_env_beats_default(tmp_path):
    env = {"FEDEM_HUB": str(tmp_path / "from-env"), "HOME": str(tmp_path / "home")}
    assert resolve_hub_path(str(tmp_path / "given"), env=env) == tmp_path / "given"
    assert resolve_hub_path(None, env=env) == tmp_path / "from-env"
    assert resolve_hub_path("", env={"HOME": "/home/ada"}) == Path("/home/ada/.local/share/fedem/hub")


def test_default_follows_xdg_data_home_when_absolute():
    assert default_hub_path({"XDG_DATA_HOME": "/data", "HOME": "/h"}) == Path("/data/fedem/hub")
    assert default_hub_path({"XDG_DATA_HOME": "rel", "HOME": "/h"}) == Path("/h/.local/share/fedem/hub")


def test_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_hub_path("hubdir", env={}) == tmp_path / "hubdir"  # the CLI resolves against its cwd
    with pytest.raises(ConfigError, match=r"`hub` is 'hubdir'; it must be an absolute path"):
        resolve_hub_path("hubdir", env={}, require_absolute=True)  # the ServerApp's run config refuses


def test_run_config_hub_must_be_absolute():
    assert load_run_config({"hub": "/srv/fedem"}).hub.path == "/srv/fedem"
    with pytest.raises(ConfigError, match=r"`hub.path` is 'srv/fedem'"):
        load_run_config({"hub": "srv/fedem"})
    assert load_config().hub.path is None


def test_readers_need_an_existing_hub(tmp_path):
    with pytest.raises(HubNotFound, match=r"folder does not exist\); pass --hub DIR or set FEDEM_HUB"):
        require_hub(tmp_path / "absent")
    with pytest.raises(HubNotFound, match="has no registry.sqlite"):
        require_hub(tmp_path)


HOLDER = textwrap.dedent("""
    import sys, time
    from fedem_flwr.hub.paths import HubWriterLock
    lock = HubWriterLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


@contextlib.contextmanager
def lock_holder(hub: Path) -> Iterator[subprocess.Popen]:
    """Another process holding ``hub``'s writer lock until it is killed (and always reaped here)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(hub)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.slow  # starts a process
def test_second_writer_fails_naming_the_holder_until_it_dies(tmp_path):
    # Prepare: another process holds the lock
    hub = tmp_path / "hub"
    with lock_holder(hub) as proc:
        # Execute / Assert
        with pytest.raises(HubLocked, match=rf"locked by another writer \(pid {proc.pid} on host "
                                            rf"{socket.gethostname()} since \d{{4}}-"):
            HubWriterLock(hub).acquire()
        assert read_lock_holder(hub)["pid"] == proc.pid
        with Registry.open(hub) as writer_less:  # the registry itself does not take the writer lock
            writer_less.add_checkpoint(None, "init", "fedem/base", None, "d", {}, 0.0)
        with Registry.open(hub, readonly=True) as reader:  # readers never take it
            assert reader.latest_checkpoint().version == 0
        os.kill(proc.pid, signal.SIGKILL)  # the kernel drops an flock with its holder
        proc.wait(timeout=30)
    assert read_lock_holder(hub) is None  # a dead pid on this host is no holder
    with HubWriterLock(hub) as lock:
        assert lock.held and read_lock_holder(hub)["pid"] == os.getpid()
    assert read_lock_holder(hub) is None


@pytest.mark.slow  # starts a process
def test_a_dead_writer_not_yet_reaped_is_no_holder(tmp_path):
    # Prepare: the writer is killed, and its parent (this test) has not reaped it: a zombie
    hub = tmp_path / "hub"
    with lock_holder(hub) as proc:
        assert pid_alive(proc.pid) and read_lock_holder(hub)["pid"] == proc.pid
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the killed writer never became a zombie"
            time.sleep(0.01)

        # Execute / Assert
        assert not pid_alive(proc.pid)
        assert read_lock_holder(hub) is None


@pytest.mark.parametrize("pid", [None, "12", True, 0, -1, 2**40])
def test_what_is_not_a_pid_is_not_alive(pid):
    assert not pid_alive(pid)


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    first = HubWriterLock(tmp_path).acquire()
    with pytest.raises(HubLocked, match=f"pid {os.getpid()}"):
        HubWriterLock(tmp_path).acquire()
    first.release()
    HubWriterLock(tmp_path).acquire().release()


def test_secret_is_created_once_and_kept(tmp_path):
    first = load_or_create_secret(tmp_path / "secret")
    assert load_or_create_secret(tmp_path / "secret") == first and len(first) == 32
    assert oct(os.stat(tmp_path / "secret").st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]  # no temporary file left behind
