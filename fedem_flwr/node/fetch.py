"""A node fetches a base checkpoint from the Hugging Face Hub itself, instead of through Flower.

When the hub keeps its artifacts on a Hugging Face Hub (``hub.store=hf``), every train message says
where the base is published: ``base-hf-repo`` (the full Hub repo id, with the hub's
``hub.repo_prefix``), the revision ``base-revision`` (a ``v{n}`` tag) and, only when the hub uses an
endpoint other than the default Hub, ``base-hf-endpoint``. A node that lacks the base downloads that
revision with ``huggingface_hub.snapshot_download`` into a temporary folder of its cache, and
``BaseCache.add`` keeps it only if its manifest digest is the message's ``base-digest``: the Hub is
a faster road, never a trusted one. When the fetch fails (no network, 401 or 404, another content
under the tag, fetch turned off), the node answers ``missing-base`` with a one-line detail, and the
hub sends that node the base in-band, through Flower, with its next lease. With the local folder
store the messages name no Hub repo and bases always travel in-band.

Node config key (``flower-supernode --node-config``):

``base-fetch``  ``hub`` (default): fetch a missing base from the Hugging Face Hub when the message
                names one; ``inband``: never reach the Hub, wait for the copy through Flower

Environment of the SuperNode:

``HF_TOKEN``        a read token, for private repos. It is sent only to the node's own endpoint
                    (``HF_ENDPOINT``, else the default Hub), never to an endpoint only a message names.
``HF_ENDPOINT``     the node's own endpoint, used when the message names none (e.g. a mirror of the
                    default Hub); a message's ``base-hf-endpoint`` takes precedence, since the repo
                    lives there.
``HF_HUB_OFFLINE``  set to 1, every fetch fails at once and bases come in-band.

No Flower here; ``huggingface_hub`` is imported only when a node fetches or a hub asks where a base
lives.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from fedem_flwr.errors import BaseUnavailable, ConfigError, DigestMismatch, one_line
from fedem_flwr.hub.store import ArtifactRef
from fedem_flwr.node.cache import BaseCache, NodeConfig

log = logging.getLogger(__name__)

HUB, INBAND = "hub", "inband"
FETCH_MODES = (HUB, INBAND)
# What a Hub repo id, a base revision and an endpoint in a train message may look like.
HF_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
BASE_REVISION = re.compile(r"^v[0-9]{1,9}$")
ENDPOINT = re.compile(r"^https?://[A-Za-z0-9.:\[\]-]+(/[A-Za-z0-9._~/-]*)?$")
MAX_ENDPOINT_CHARS = 200
_NOT_ARTIFACT = [".gitattributes"]  # the Hub adds one to every repo; never part of an artifact


@dataclass(frozen=True)
class HfLocation:
    """Where a base is published on a Hugging Face Hub: full repo id, revision and, when it is not
    the default Hub, the endpoint ("" lets the node use its own)."""

    repo_id: str
    revision: str
    endpoint: str = ""

    def __str__(self) -> str:
        return f"{self.endpoint + '/' if self.endpoint else ''}{self.repo_id}@{self.revision}"


def default_endpoint() -> str:
    from huggingface_hub import constants

    return constants._HF_DEFAULT_ENDPOINT.rstrip("/")


def hf_location(store: Any, ref: ArtifactRef) -> Optional[HfLocation]:
    """Where a node can fetch ``ref`` itself: its Hub repo and revision when ``store`` is on a
    Hugging Face Hub (the endpoint only when it is not the default), None for the local store."""
    from fedem_flwr.hub.hf_store import HfStore

    if not isinstance(store, HfStore):
        return None
    endpoint = store.endpoint.rstrip("/")
    return HfLocation(store.repo_id(ref.repo), ref.revision, "" if endpoint == default_endpoint() else endpoint)


def fetch_mode(node_config: NodeConfig) -> str:
    """The node's ``base-fetch`` key: ``hub`` (the default) or ``inband``."""
    mode = str(node_config.get("base-fetch", HUB)).strip().lower()
    if mode not in FETCH_MODES:
        raise ConfigError(
            f"`base-fetch` is {node_config.get('base-fetch')!r}; allowed: {', '.join(FETCH_MODES)}, e.g. "
            f"--node-config 'base-fetch={INBAND}' to take bases only through Flower."
        )
    return mode


def endpoint_and_token(location: HfLocation, env: Mapping[str, str]) -> tuple[str, Union[str, bool]]:
    """The endpoint to fetch from and the token to send there (``False``: none, and
    ``huggingface_hub`` must not look for one either): ``HF_TOKEN`` goes only to the node's own
    endpoint."""
    own = (env.get("HF_ENDPOINT") or default_endpoint()).rstrip("/")
    endpoint = (location.endpoint or own).rstrip("/")
    token = env.get("HF_TOKEN") if endpoint == own else None
    return endpoint, token or False


def fetch_base(cache: BaseCache, base_digest: str, location: HfLocation, env: Mapping[str, str] = os.environ) -> Path:
    """Download ``location`` into the cache as ``base_digest``; any failure, a digest mismatch
    included, raises ``BaseUnavailable`` with one line naming the repo and the cause."""
    from huggingface_hub import snapshot_download

    endpoint, token = endpoint_and_token(location, env)
    where = f"{endpoint}/{location.repo_id}@{location.revision}"

    def write(folder: Path) -> None:
        snapshot_download(
            location.repo_id, revision=location.revision, endpoint=endpoint, token=token,
            local_dir=folder, ignore_patterns=_NOT_ARTIFACT,
        )
        shutil.rmtree(folder / ".cache", ignore_errors=True)  # the download's own bookkeeping

    started = time.monotonic()
    try:
        path = cache.add(base_digest, write)
    except DigestMismatch as err:
        log.debug("Digest mismatch: %s", err)
        raise BaseUnavailable(f"{where} is not base {base_digest[:12]}: its files hash to another digest") from err
    except Exception as err:  # noqa: BLE001 - whatever the fetch raises, the base comes in-band instead
        raise BaseUnavailable(f"could not fetch {where} ({'with' if token else 'without'} a token): "
                              f"{one_line(err, 160)}") from err
    log.info("Base %s fetched from %s in %.1f s", base_digest[:12], where, time.monotonic() - started)
    return path


def ensure_base(
    cache: BaseCache, base_digest: str, location: Optional[HfLocation], node_config: NodeConfig,
    env: Mapping[str, str] = os.environ,
) -> str:
    """"" when the base is cached, fetched from the Hub now if the message says where and the node
    allows it; otherwise why it is missing, in one line (the ``missing-base`` reply's detail)."""
    mode = fetch_mode(node_config)  # checked on every message, so a bad value shows at once
    if cache.has(base_digest):
        return ""
    if location is None:
        return f"base {base_digest[:12]} not cached in {cache.root} and not sent"
    if mode == INBAND:
        return f"base {base_digest[:12]} not cached; Hub fetch is off (base-fetch={INBAND})"
    try:
        fetch_base(cache, base_digest, location, env)
    except BaseUnavailable as err:
        log.warning("%s; asking for the in-band copy", err)
        return str(err)
    return ""
