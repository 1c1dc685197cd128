"""``fedem certs``, ``fedem node-key`` and ``fedem connection``: the credentials a deployment on the
internet needs, made with the ``cryptography`` package Flower already depends on (see
docs/deployment.md). None of them touches a hub's state."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from fedem_flwr.deploy.credentials import certificate_names, node_key, server_credentials
from fedem_flwr.launch.flwr_cli import write_connection

folder_type = click.Path(file_okay=False, path_type=Path)
file_type = click.Path(dir_okay=False, path_type=Path)


@click.command()
@click.option("--out", required=True, type=folder_type, help="Folder for ca.crt, ca.key, server.crt, server.key.")
@click.option("--host", "hosts", multiple=True, required=True,
              help="A DNS name or IP address contributors dial (repeatable); 127.0.0.1 and localhost are added.")
@click.option("--days", default=365, show_default=True, type=click.IntRange(min=1),
              help="How long the server certificate is valid.")
@click.option("--force", is_flag=True, help="Issue a new server certificate over an existing one (the CA is kept).")
def certs(out: Path, hosts: tuple[str, ...], days: int, force: bool) -> None:
    """Make the hub's CA (once) and a server certificate for the SuperLink's TLS.

    Give contributors ca.crt (for --root-certificates); keep ca.key and server.key on the hub.

    Example: fedem certs --out /srv/fedem/certs --host hub.example.org
    """
    made = server_credentials(out, list(hosts), days=days, force=force)
    click.echo(f"CA certificate:     {made.ca_cert}  (give it to contributors)")
    click.echo(f"server certificate: {made.server_cert}  names {', '.join(certificate_names(made.server_cert))}")
    click.echo(f"server key:         {made.server_key}  (mode 0600; stays on the hub)")


@click.command("node-key")
@click.option("--out", required=True, type=file_type, help="Private key file; the public key goes beside it (.pub).")
@click.option("--force", is_flag=True, help="Replace an existing key (the hub then sees a new contributor).")
def node_key_command(out: Path, force: bool) -> None:
    """Make a SuperNode's key pair (OpenSSH ECDSA P-384, as `ssh-keygen -t ecdsa -b 384` writes).

    Send the .pub file to the hub operator; keep the private key: your pseudonym and history follow it.

    Example: fedem node-key --out ~/.fedem/supernode-key
    """
    made = node_key(out, force=force)
    click.echo(f"private key: {made.private}  (mode 0600; pass it to --auth-supernode-private-key)")
    click.echo(f"public key:  {made.public}  (send it to the hub operator)")


@click.command()
@click.argument("name")
@click.argument("address")
@click.option("--ca", "ca_cert", type=file_type, default=None,
              help="The hub's CA certificate; without it the connection is insecure (loopback tests only).")
@click.option("--flwr-home", type=folder_type, envvar="FLWR_HOME", default=None,
              help="Flower's config folder [env FLWR_HOME; default ~/.flwr].")
def connection(name: str, address: str, ca_cert: Optional[Path], flwr_home: Optional[Path]) -> None:
    """Save a SuperLink connection for `flwr run . NAME`, `flwr ls NAME`, ... (and make it the default).

    Example: fedem connection fedem-hub hub.example.org:9092 --ca /srv/fedem/certs/ca.crt
    """
    if ca_cert is not None and not ca_cert.is_file():
        raise click.BadParameter(f"{ca_cert} is not a file", param_hint="--ca")
    home = flwr_home or Path.home() / ".flwr"
    write_connection(home, name, address, ca_cert)
    click.echo(f"connection {name!r} -> {address} ({'TLS' if ca_cert else 'insecure'}) in {home / 'config.toml'}")
