"""The config tree (``conf/`` at the repository root) is found from a checkout or editable install,
a plain wheel and an installed Flower app bundle alike: each imports fedem_flwr from its own place
in a fresh interpreter and composes the default config from the tree that travelled with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

PROBE = (
    "import json, fedem_flwr; "
    "from fedem_flwr.config.loader import config_dir, load_config; cfg = load_config(['lora.r=4']); "
    "print(json.dumps({'package': fedem_flwr.__file__, 'conf': str(config_dir()), "
    "'model': cfg.model.name, 'r': cfg.lora.r}))"
)


def _probe(path_entry: Path | None, cwd: Path) -> dict:
    """Import fedem_flwr in a new interpreter, with ``path_entry`` first on its path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FEDEM_CONF_DIR")}
    if path_entry is not None:
        env["PYTHONPATH"] = str(path_entry)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # starts a process
def test_checkout_and_editable_install_read_conf_at_the_repository_root(tmp_path):
    found = _probe(None, cwd=tmp_path)  # the installed (editable) package, from an unrelated folder
    assert Path(found["conf"]) == REPO / "conf"
    assert (found["model"], found["r"]) == ("seshu-tiny", 4)
    assert _probe(REPO, cwd=tmp_path)["conf"] == str(REPO / "conf")


@pytest.mark.slow  # starts a process
def test_a_plain_wheel_carries_the_config_tree_inside_the_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("fedem_flwr-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    assert "fedem_flwr/conf/config.yaml" in names and "fedem_flwr/conf/model/seshu-tiny.yaml" in names
    assert not any(name.startswith("conf/") for name in names)
    found = _probe(tmp_path / "site", cwd=tmp_path)
    assert Path(found["package"]).is_relative_to(tmp_path / "site")
    assert Path(found["conf"]) == tmp_path / "site" / "fedem_flwr" / "conf"
    assert found["model"] == "seshu-tiny"


@pytest.mark.slow  # starts a process
def test_an_installed_flower_app_bundle_finds_conf_beside_the_package(tmp_path):
    from flwr.cli.install import install_from_fab

    subprocess.run([str(Path(sys.executable).parent / "flwr"), "build", "--app", str(REPO)], cwd=tmp_path,
                   check=True, capture_output=True, timeout=300)
    (fab,) = tmp_path.glob("*.fab")
    installed = install_from_fab(fab, install_dir=tmp_path / "flwr-home", skip_prompt=True)
    assert (installed / "conf" / "config.yaml").is_file()
    found = _probe(installed, cwd=tmp_path)
    assert Path(found["package"]).is_relative_to(installed)
    assert Path(found["conf"]) == installed / "conf"
    assert found["model"] == "seshu-tiny"


def test_an_explicit_config_tree_wins_and_a_missing_one_is_named(tmp_path, monkeypatch):
    from fedem_flwr.config.loader import load_config
    from fedem_flwr.errors import ConfigError

    monkeypatch.setenv("FEDEM_CONF_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="FEDEM_CONF_DIR"):
        load_config()
