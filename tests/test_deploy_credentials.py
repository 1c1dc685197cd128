"""Certificates and keys for a deployment (fast: no Flower process): what `fedem certs`, `fedem node-key`
and `fedem connection` write, that Flower reads it, and that nothing is overwritten by surprise."""

from __future__ import annotations

import datetime as dt
import ssl
import stat
import subprocess
import sys

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flwr.cli.supernode.register import try_load_public_key

from fedem_flwr.cli import cli
from fedem_flwr.deploy.credentials import CredentialsError, certificate_names, node_key, server_credentials
from fedem_flwr.launch.flwr_cli import write_connection
from fedem_flwr.protocol.faults import NODE_FAULTS_ENV, take_node_fault
from fedem_flwr.relay.nodes import key_identity
from tests.support.guide import GUIDE, Guide, guide_steps, untested_steps

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def test_server_certificate_names_the_host_and_loopback_and_chains_to_the_ca(tmp_path):
    # Execute
    made = server_credentials(tmp_path, ["hub.example.org", "203.0.113.7"])

    # Assert
    assert certificate_names(made.server_cert) == ["hub.example.org", "203.0.113.7", "127.0.0.1", "localhost"]
    context = ssl.create_default_context(cafile=str(made.ca_cert))
    context.load_cert_chain(made.server_cert, made.server_key)  # the key matches the certificate
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(made.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    for key in (made.server_key, tmp_path / "ca.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_a_new_server_certificate_keeps_the_ca_and_needs_force(tmp_path):
    # Prepare
    first = server_credentials(tmp_path, ["hub.example.org"])
    ca_before = first.ca_cert.read_bytes()

    # Execute / Assert
    with pytest.raises(CredentialsError, match="--force"):
        server_credentials(tmp_path, ["hub.example.org"])
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=300)
    second = server_credentials(tmp_path, ["hub2.example.org"], force=True, now=lambda: later)
    assert second.ca_cert.read_bytes() == ca_before
    assert certificate_names(second.server_cert)[0] == "hub2.example.org"
    x509.load_pem_x509_certificate(second.server_cert.read_bytes()).verify_directly_issued_by(
        x509.load_pem_x509_certificate(ca_before))


@pytest.mark.parametrize("host", ["", "two words", "http://hub"])
def test_a_host_that_is_no_name_is_refused(tmp_path, host):
    with pytest.raises(CredentialsError, match="neither an IP address nor a DNS name"):
        server_credentials(tmp_path, [host])


def test_half_a_ca_is_refused_rather_than_replaced(tmp_path):
    # Prepare
    server_credentials(tmp_path, ["hub"])
    (tmp_path / "ca.key").unlink()

    # Execute / Assert
    with pytest.raises(CredentialsError, match="half a CA"):
        server_credentials(tmp_path, ["hub"], force=True)


def test_node_key_is_what_flower_registers_and_identity_follows_it(tmp_path):
    # Execute
    made = node_key(tmp_path / "keys" / "alice")

    # Assert: `flwr supernode register` reads the public key; its identity is the hub's `pk:` key.
    pem = try_load_public_key(made.public)
    private = serialization.load_ssh_private_key(made.private.read_bytes(), None)
    assert private.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo) == pem
    assert key_identity(7, pem) == key_identity(8, pem) != key_identity(7, b"")
    assert stat.S_IMODE(made.private.stat().st_mode) == 0o600
    with pytest.raises(CredentialsError, match="identity on the hub"):
        node_key(made.private)


def test_cli_writes_certificates_a_key_and_a_tls_connection(tmp_path):
    # Execute
    runner = CliRunner()
    certs = runner.invoke(cli, ["certs", "--out", str(tmp_path / "certs"), "--host", "hub.example.org"])
    key = runner.invoke(cli, ["node-key", "--out", str(tmp_path / "node")])
    conn = runner.invoke(cli, ["connection", "fedem-hub", "hub.example.org:9092",
                               "--ca", str(tmp_path / "certs" / "ca.crt"), "--flwr-home", str(tmp_path / "flwr")])
    again = runner.invoke(cli, ["certs", "--out", str(tmp_path / "certs"), "--host", "hub.example.org"])

    # Assert
    assert certs.exit_code == key.exit_code == conn.exit_code == 0, certs.output + key.output + conn.output
    assert "127.0.0.1" in certs.output and (tmp_path / "node.pub").exists()
    config = tomllib.loads((tmp_path / "flwr" / "config.toml").read_text())
    assert config["superlink"]["default"] == "fedem-hub"
    assert config["superlink"]["fedem-hub"] == {"address": "hub.example.org:9092",
                                                "root-certificates": str((tmp_path / "certs" / "ca.crt").resolve())}
    assert again.exit_code == 1 and "--force" in again.output


def test_connection_keeps_other_connections(tmp_path):
    # Prepare
    write_connection(tmp_path, "local", "127.0.0.1:9093")

    # Execute
    write_connection(tmp_path, "fedem-hub", "hub:9092", tmp_path / "ca.crt")

    # Assert
    config = tomllib.loads((tmp_path / "config.toml").read_text())
    assert config["superlink"]["local"] == {"address": "127.0.0.1:9093", "insecure": True}
    assert config["superlink"]["default"] == "fedem-hub"


def test_guide_steps_are_found_in_order_and_untested_ones_are_named(tmp_path):
    # Prepare
    doc = tmp_path / "guide.md"
    doc.write_text("# Guide\n\n<!-- test: one -->\n```bash\necho \"$GREETING\"\n```\n\ntext\n\n"
                   "```bash\nnot a step\n```\n\n<!-- test: two -->\n```bash\nexit 3\n```\n")

    # Execute
    guide = Guide({"GREETING": "hello"}, tmp_path / "flwr", path=doc)
    done = guide.run("one")

    # Assert
    assert list(guide_steps(doc)) == ["one", "two"]
    assert done.stdout == "hello\n"
    assert untested_steps(guide.ran, doc) == ["two"]
    with pytest.raises(Exception, match="step 'two' failed"):
        guide.run("two")
    with pytest.raises(KeyError, match="no step 'three'"):
        guide.run("three")


def test_the_deployment_guide_has_every_step_the_deployment_test_runs():
    steps = guide_steps(GUIDE)
    assert {"certs", "superlink", "connection", "register", "node-key", "node-key-ssh", "supernode", "run", "ls",
            "log", "status", "stop", "prune", "backup-key", "backup", "restore"} == set(steps)
    assert "--enable-supernode-auth" in steps["superlink"] and "--insecure" not in "".join(steps.values())


def test_node_faults_are_taken_one_per_reply_in_order(tmp_path, monkeypatch):
    # Prepare
    queue = tmp_path / "faults"
    queue.write_text("wrong-token\n\nlate\n")
    monkeypatch.setenv(NODE_FAULTS_ENV, str(queue))

    # Execute / Assert
    assert [take_node_fault(), take_node_fault(), take_node_fault()] == ["wrong-token", "late", None]
    queue.write_text("explode\n")
    with pytest.raises(ValueError, match="unknown fault 'explode'"):
        take_node_fault()
    monkeypatch.delenv(NODE_FAULTS_ENV)
    assert take_node_fault() is None


@pytest.mark.slow  # starts a process
def test_fedem_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "fedem_flwr.cli", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "node-key" in done.stdout
