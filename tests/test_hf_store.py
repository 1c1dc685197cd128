"""HfStore and publish_hub against the local Hub endpoint, through the real huggingface_hub client."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError

from fedem_flwr.errors import ConfigError, DigestMismatch, HubUnreachable, RevisionExists, RevisionNotFound
from fedem_flwr.hub.hf_store import HfStore, hf_repo_id
from fedem_flwr.hub.manifest import digest, manifest
from fedem_flwr.hub.model_card import adapter_card
from fedem_flwr.hub.store import ArtifactRef, LocalStore, Problem, adapter_repo, base_repo
from tests.support.hf_server import hub_environment

REPO = adapter_repo("fedem", "hi")


def artifact(folder: Path, weights: bytes = b"\x00\x01") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text('{"r": 2}')
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hf_store(local_hub, tmp_path):
    return HfStore("org/proj", endpoint=local_hub.endpoint, cache_dir=tmp_path / "cache", sleep=lambda s: None)


@pytest.mark.parametrize(
    ("repo", "prefix", "expected"),
    [("fedem/base", "org/proj", "org/proj-base"), ("fedem/adapter-hi", "org/proj", "org/proj-adapter-hi"),
     ("fedem/adapter-hi", "org", "org/adapter-hi"), ("org/x", None, "org/x")],
)
def test_store_repos_map_to_hub_ids_with_one_slash(repo, prefix, expected):
    assert hf_repo_id(repo, prefix) == expected


def test_an_invalid_prefix_names_the_key():
    with pytest.raises(ConfigError, match="`hub.repo_prefix` 'a/b/c'"):
        hf_repo_id("fedem/base", "a/b/c")


def test_put_tags_a_commit_and_get_returns_the_verified_files(hf_store, local_hub, tmp_path):
    # Prepare
    card = adapter_card("org/proj-adapter-hi", "hi", 0, "org/proj-base", "v0", ["hi"], ["c-1a2b"])
    src = artifact(tmp_path / "v0")
    (src / ".gitattributes").write_text("*.bin filter=lfs\n")

    # Execute
    ref = hf_store.put(REPO, "v0", src, "fresh LoRA", card=card)
    ref1 = hf_store.put(REPO, "v1", artifact(tmp_path / "v1", b"\x02"), "accepted")
    path = hf_store.get(ref)

    # Assert
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert ref == ArtifactRef(REPO, "v0", digest(path))
    assert ModelCard((path / "README.md").read_text()).data.contributors == ["c-1a2b"]
    assert hf_store.revisions(REPO) == ["v0", "v1"]
    assert hf_store.repos() == ["org/proj-adapter-hi"]
    api = HfApi(endpoint=local_hub.endpoint)
    main = api.model_info("org/proj-adapter-hi").sha
    assert [t.target_commit for t in api.list_repo_refs("org/proj-adapter-hi").tags if t.name == "v1"] == [main]
    assert sorted(api.list_repo_files("org/proj-adapter-hi")) == [".gitattributes", "adapter_config.json",
                                                                   "adapter_model.safetensors"]
    assert manifest(hf_store.get(ref1)) == manifest(tmp_path / "v1") and hf_store.verify_all() == []


def test_put_is_idempotent_and_never_moves_a_tag(hf_store, tmp_path):
    first, uploaded = hf_store.push(REPO, "v0", artifact(tmp_path / "a"), "m")

    again, uploaded_again = hf_store.push(REPO, "v0", artifact(tmp_path / "b"), "m")
    with pytest.raises(RevisionExists, match="org/proj-adapter-hi@v0"):
        hf_store.put(REPO, "v0", artifact(tmp_path / "c", b"other"), "m")

    assert (uploaded, uploaded_again) == (True, False) and again == first


def test_a_missing_revision_names_repo_and_revision(hf_store, tmp_path):
    hf_store.put(REPO, "v0", artifact(tmp_path / "a"), "m")

    with pytest.raises(RevisionNotFound, match="'v4' of repo 'org/proj-adapter-hi'"):
        hf_store.get(ArtifactRef(REPO, "v4", "0" * 64))
    with pytest.raises(RevisionNotFound, match="org/proj-base"):
        hf_store.get(ArtifactRef(base_repo("fedem"), "v0", "0" * 64))


def test_an_unreachable_endpoint_is_reported_quickly_after_bounded_backoff(tmp_path):
    sleeps: list[float] = []
    endpoint = f"http://127.0.0.1:{closed_port()}"
    store = HfStore("org/proj", endpoint=endpoint, cache_dir=tmp_path, tries=3, backoff_s=0.5, sleep=sleeps.append)

    started = time.monotonic()
    with pytest.raises(HubUnreachable, match=endpoint) as err:
        store.put(REPO, "v0", artifact(tmp_path / "a"), "m")
    with pytest.raises(HubUnreachable, match=endpoint):
        store.get(ArtifactRef(REPO, "v0", "0" * 64))

    assert sleeps == [0.5, 1.0, 0.5, 1.0]
    assert "3 times" in str(err.value)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_a_transient_answer_is_tried_again_after_a_backoff(local_hub, tmp_path, status):
    sleeps: list[float] = []
    store = HfStore("org/proj", endpoint=local_hub.endpoint, cache_dir=tmp_path / "cache", sleep=sleeps.append)
    store.put(REPO, "v0", artifact(tmp_path / "a"), "m")
    local_hub.fail("GET", "/refs", status=status, times=2)  # the third and last try gets through

    assert store.revisions(REPO) == ["v0"] and sleeps == [0.5, 1.0]


@pytest.mark.parametrize("status", [400, 403, 422])
def test_a_final_answer_is_raised_at_once(local_hub, tmp_path, status):
    sleeps: list[float] = []
    store = HfStore("org/proj", endpoint=local_hub.endpoint, cache_dir=tmp_path / "cache", sleep=sleeps.append)
    store.put(REPO, "v0", artifact(tmp_path / "a"), "m")
    local_hub.fail("GET", "/refs", status=status, times=1)

    with pytest.raises(HfHubHTTPError) as err:
        store.revisions(REPO)

    assert err.value.response.status_code == status and sleeps == []


def test_a_missing_revision_is_not_tried_again(local_hub, tmp_path):
    sleeps: list[float] = []
    store = HfStore("org/proj", endpoint=local_hub.endpoint, cache_dir=tmp_path / "cache", sleep=sleeps.append)
    store.put(REPO, "v0", artifact(tmp_path / "a"), "m")

    with pytest.raises(RevisionNotFound):
        store.get(ArtifactRef(REPO, "v9", "0" * 64))

    assert sleeps == []


def test_the_last_transient_failure_is_named_in_hub_unreachable(local_hub, tmp_path):
    store = HfStore("org/proj", endpoint=local_hub.endpoint, cache_dir=tmp_path / "cache", tries=2,
                    sleep=lambda s: None)
    store.put(REPO, "v0", artifact(tmp_path / "a"), "m")
    local_hub.fail("GET", "/refs", status=429, times=2)

    with pytest.raises(HubUnreachable, match=r"listing refs of org/proj-adapter-hi failed 2 times \(HfHubHTTPError: "
                                             r"429") as err:
        store.revisions(REPO)

    assert err.value.__cause__.response.status_code == 429


def test_a_failed_upload_leaves_no_tag_and_a_retry_completes(hf_store, local_hub, tmp_path):
    # Prepare: the commit endpoint fails more times than the store tries
    local_hub.fail("POST", "/commit/", status=503, times=3)
    api = HfApi(endpoint=local_hub.endpoint)

    # Execute
    with pytest.raises(HubUnreachable, match="uploading org/proj-adapter-hi@v0"):
        hf_store.put(REPO, "v0", artifact(tmp_path / "a"), "m")
    tags_after_failure = api.list_repo_refs("org/proj-adapter-hi").tags
    local_hub.fail("POST", "/commit/", status=503, times=2)  # transient: the third try succeeds
    ref = hf_store.put(REPO, "v0", artifact(tmp_path / "a"), "m")

    # Assert
    assert tags_after_failure == []
    assert hf_store.revisions(REPO) == ["v0"] and hf_store.get(ref)


def test_a_corrupted_cache_is_downloaded_again_and_corruption_on_the_hub_is_a_mismatch(hf_store, local_hub, tmp_path):
    ref = hf_store.put(REPO, "v0", artifact(tmp_path / "a", b"\x00\x01"), "m")
    cached = hf_store.get(ref) / "adapter_model.safetensors"
    cached.resolve().write_bytes(b"\xff\xff")

    assert hf_store.get(ref) == cached.parent and cached.read_bytes() == b"\x00\x01"

    repo = local_hub.store.get("model", "org/proj-adapter-hi")
    blob = local_hub.store.resolve(repo, "v0").tree["adapter_model.safetensors"]
    local_hub.store.blob_path(blob).write_bytes(b"\x07\x07")
    cached.resolve().write_bytes(b"\x07\x07")
    with pytest.raises(DigestMismatch, match=ref.digest):
        hf_store.get(ref)
    assert [p.kind for p in hf_store.verify_all()] == ["mismatch"]


def test_offline_mode_serves_the_cache_and_names_what_is_not_cached(hf_store, local_hub, tmp_path):
    ref = hf_store.put(REPO, "v0", artifact(tmp_path / "a"), "m")
    hf_store.get(ref)

    with hub_environment(local_hub.endpoint, tmp_path / "home", offline=True):
        offline = HfStore("org/proj", endpoint=local_hub.endpoint, cache_dir=tmp_path / "cache")
        assert offline.offline
        before = len(local_hub.requests)
        assert manifest(offline.get(ref)) == manifest(tmp_path / "a")
        with pytest.raises(HubUnreachable, match="HF_HUB_OFFLINE.*'v1' of repo 'org/proj-adapter-hi'"):
            offline.get(ArtifactRef(REPO, "v1", "0" * 64))
        with pytest.raises(HubUnreachable, match="HF_HUB_OFFLINE"):
            offline.put(REPO, "v1", tmp_path / "a", "m")
        assert len(local_hub.requests) == before


def test_verify_all_compares_tags_with_the_registry(hf_store, local_hub, tmp_path):
    v0 = hf_store.put(REPO, "v0", artifact(tmp_path / "a"), "m")
    hf_store.put(REPO, "v1", artifact(tmp_path / "b", b"1"), "m")
    before = len(local_hub.requests)

    problems = hf_store.verify_all({(REPO, "v0", v0.digest), (base_repo("fedem"), "v0", "e" * 64)})

    assert problems == [
        Problem("orphan", "org/proj-adapter-hi", "v1", problems[0].detail),
        Problem("missing", "org/proj-base", "v0", "in the registry but not in the store"),
    ]
    assert sum(r.endswith("/refs") for r in local_hub.requests[before:]) == 1  # tags listed once per repo


def test_an_orphan_tag_is_moved_to_the_new_content_when_the_registry_lacks_it(hf_store, local_hub, tmp_path):
    # Prepare: v1 tagged, its registry row never committed
    v0 = hf_store.put(REPO, "v0", artifact(tmp_path / "a"), "m")
    hf_store.put(REPO, "v1", artifact(tmp_path / "orphan", b"lost"), "m")
    new = artifact(tmp_path / "new", b"new")

    # Execute
    with pytest.raises(RevisionExists):
        hf_store.put(REPO, "v1", new, "m")
    ref = hf_store.put(REPO, "v1", new, "m", replace_orphan=True)

    # Assert
    assert manifest(hf_store.get(ref)) == manifest(new) and hf_store.revisions(REPO) == ["v0", "v1"]
    assert hf_store.verify_all({(REPO, "v0", v0.digest), (REPO, "v1", ref.digest)}) == []
    api = HfApi(endpoint=local_hub.endpoint)
    main = api.model_info("org/proj-adapter-hi").sha
    assert {t.name: t.target_commit for t in api.list_repo_refs("org/proj-adapter-hi").tags}["v1"] == main


def test_repair_deletes_orphan_tags_only(hf_store, tmp_path):
    v0 = hf_store.put(REPO, "v0", artifact(tmp_path / "a"), "m")
    hf_store.put(REPO, "v1", artifact(tmp_path / "b", b"1"), "m")
    known = {(REPO, "v0", v0.digest)}

    removed = hf_store.repair(hf_store.verify_all(known))

    assert [(p.kind, p.repo, p.revision) for p in removed] == [("orphan", "org/proj-adapter-hi", "v1")]
    assert hf_store.revisions(REPO) == ["v0"] and hf_store.verify_all(known) == []


# -- publish_hub -------------------------------------------------------------------------------
def test_publish_pushes_every_version_once_and_the_adapter_loads_by_repo_id(hf_env, tmp_path):
    import peft
    import torch
    import transformers

    from fedem_flwr.hub.publish import publish_hub
    from fedem_flwr.hub.registry import Registry

    # Prepare: a hub folder with a base v0 and adapter `hi` v0 (fresh) and v1 (one accepted contribution)
    hub = tmp_path / "hub"
    store, registry = LocalStore(hub / "store"), Registry.memory()
    torch.manual_seed(0)
    config = transformers.Mamba2Config(vocab_size=260, hidden_size=32, num_hidden_layers=1, num_heads=4,
                                       head_dim=16, expand=2, state_size=8, n_groups=1)
    base = transformers.Mamba2ForCausalLM(config)
    base.save_pretrained(tmp_path / "base")
    ref = store.put(base_repo("fedem"), "v0", tmp_path / "base", "seed")
    registry.add_checkpoint(None, "init", ref.repo, ref.revision, ref.digest, {}, created=1.0)
    registry.add_adapter("hi", ["hi"], "chat", {"r": 2}, created=1.0)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["in_proj"], init_lora_weights=False))
    for version in (0, 1):
        lora.save_pretrained(tmp_path / f"hi-v{version}")
        ref = store.put(REPO, f"v{version}", tmp_path / f"hi-v{version}", "m")
        registry.add_adapter_version("hi", 0, version - 1 if version else None, ref.repo, ref.revision,
                                     ref.digest, {"loss": {"hi": 2.5 - version}}, created=2.0 + version)
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.add_(0.5)
    registry.add_contribution(registry.pseudonym("sim:3"), "hi", None, 3.0, ref.digest, {}, {}, "accepted",
                              "own languages improved", adapter_version=1)
    sleeps: list[float] = []

    # Execute
    pushed = publish_hub(hub, registry, "org/proj", endpoint=hf_env.endpoint, sleep=sleeps.append)
    pushed_again = publish_hub(hub, registry, "org/proj", endpoint=hf_env.endpoint, sleep=sleeps.append)
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained("org/proj-adapter-hi")

    # Assert
    assert pushed == ["org/proj-base@v0", "org/proj-adapter-hi@v0", "org/proj-adapter-hi@v1"]
    assert pushed_again == [] and sleeps == []
    published = HfStore(endpoint=hf_env.endpoint).local_path("org/proj-adapter-hi", "v1")
    adapter_config = json.loads((published / "adapter_config.json").read_text())
    assert (adapter_config["base_model_name_or_path"], adapter_config["revision"]) == ("org/proj-base", "v0")
    card = ModelCard((published / "README.md").read_text()).data
    assert card.contributors == [registry.pseudonym("sim:3")] and card.language == ["hi"]
    assert card.base_model == "org/proj-base" and card.eval_results[0].metric_value == 1.5
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        expected = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(store.local_path(base_repo("fedem"), "v0")),
            store.local_path(REPO, "v1"),
        )(ids).logits
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-6)
    # Each revision is recorded as published there (retention's `publish_first` reads it) with its registry digest
    target = "hf:" + hf_env.endpoint.rstrip("/")
    assert {key: (p["target"], p["digest"]) for key, p in registry.publications().items()} == {
        (base_repo("fedem"), "v0"): (target, registry.checkpoint(0).digest),
        (REPO, "v0"): (target, registry.adapter_version("hi", 0).digest),
        (REPO, "v1"): (target, registry.adapter_version("hi", 1).digest)}
    # A version retention pruned after publishing it is skipped, not an error
    registry.mark_version_pruned("hi", 0, at=9.0)
    store.remove(REPO, "v0")
    assert publish_hub(hub, registry, "org/proj", endpoint=hf_env.endpoint, sleep=sleeps.append) == []
