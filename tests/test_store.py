"""Manifest digests and the local artifact store: atomic puts, verified gets, crashes, verify_all."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedem_flwr.errors import ConfigError, DigestMismatch, RevisionExists, RevisionNotFound
from fedem_flwr.hub.manifest import digest, manifest, serialise, verify_folder
from fedem_flwr.hub.store import (
    ArtifactRef,
    ArtifactStore,
    LocalStore,
    Problem,
    adapter_repo,
    base_repo,
)
from fedem_flwr.hub.stores import open_store

REPO = adapter_repo("fedem", "hi")


def make_artifact(folder: Path, weights: bytes = b"\x00\x01\x02", config: str = '{"r": 4}') -> Path:
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(config)
    (folder / "sub" / "adapter_model.safetensors").write_bytes(weights)
    return folder


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- manifest ----------------------------------------------------------------------------------
def test_manifest_is_sorted_posix_paths_with_sha256_and_size(tmp_path):
    # Prepare
    folder = make_artifact(tmp_path / "a")

    # Execute
    entries = manifest(folder)

    # Assert
    assert entries == [
        ("adapter_config.json", sha(b'{"r": 4}'), 8),
        ("sub/adapter_model.safetensors", sha(b"\x00\x01\x02"), 3),
    ]


def test_digest_is_sha256_of_the_documented_canonical_json(tmp_path):
    folder = make_artifact(tmp_path / "a")
    expected_bytes = (
        '[["adapter_config.json","' + sha(b'{"r": 4}') + '",8],'
        '["sub/adapter_model.safetensors","' + sha(b"\x00\x01\x02") + '",3]]'
    ).encode()

    assert serialise(manifest(folder)) == expected_bytes
    assert digest(folder) == hashlib.sha256(expected_bytes).hexdigest()


def test_digest_ignores_times_and_creation_order_but_not_names(tmp_path):
    first = make_artifact(tmp_path / "a")
    second = tmp_path / "b"
    (second / "sub").mkdir(parents=True)
    (second / "sub" / "adapter_model.safetensors").write_bytes(b"\x00\x01\x02")
    (second / "adapter_config.json").write_text('{"r": 4}')
    os.utime(second / "adapter_config.json", (1, 1))

    assert digest(first) == digest(second)
    (second / "adapter_config.json").rename(second / "config.json")
    assert digest(first) != digest(second)


def test_verify_folder_names_changed_missing_and_unexpected_files(tmp_path):
    folder = make_artifact(tmp_path / "a")
    recorded, expected = manifest(folder), digest(folder)
    (folder / "sub" / "adapter_model.safetensors").write_bytes(b"\xff")
    (folder / "adapter_config.json").unlink()
    (folder / "extra.txt").write_text("x")

    with pytest.raises(DigestMismatch) as err:
        verify_folder(folder, expected, recorded)

    message = str(err.value)
    assert "changed sub/adapter_model.safetensors" in message
    assert "missing adapter_config.json" in message
    assert "unexpected extra.txt" in message
    assert expected in message


# -- put / get ---------------------------------------------------------------------------------
def test_put_then_get_returns_a_verified_copy_and_main_is_the_latest_version(tmp_path):
    # Prepare
    store = LocalStore(tmp_path / "store")
    v0 = make_artifact(tmp_path / "v0")
    v1 = make_artifact(tmp_path / "v1", weights=b"\x09")

    # Execute
    ref1 = store.put(REPO, "v1", v1, "accepted contribution 7")
    ref0 = store.put(REPO, "v0", v0, "fresh LoRA")

    # Assert
    assert isinstance(store, ArtifactStore)
    assert ref0 == ArtifactRef(REPO, "v0", digest(v0))
    assert store.get(ref0) == tmp_path / "store" / "fedem" / "adapter-hi" / "v0"
    assert manifest(store.get(ref1)) == manifest(v1)
    assert store.local_path(REPO, "main") == store.local_path(REPO, "v1")
    assert store.revisions(REPO) == ["v0", "v1"]
    assert store.repos() == [REPO]
    refs = json.loads((tmp_path / "store" / REPO / "refs.json").read_text())
    assert refs["main"] == "v1" and refs["revisions"]["v0"]["digest"] == ref0.digest
    assert store.verify_all({(REPO, "v0", ref0.digest), (REPO, "v1", ref1.digest)}) == []


def test_versions_order_numerically_not_as_strings(tmp_path):
    store = LocalStore(tmp_path / "store")
    for n in (2, 10, 9):
        store.put(REPO, f"v{n}", make_artifact(tmp_path / f"v{n}", weights=bytes([n])), "m")

    assert store.revisions(REPO) == ["v2", "v9", "v10"]
    assert store.local_path(REPO, "main").name == "v10"


def test_put_of_the_same_content_is_idempotent_and_other_content_is_refused(tmp_path):
    store = LocalStore(tmp_path / "store")
    first = store.put(REPO, "v0", make_artifact(tmp_path / "a"), "m")

    again = store.put(REPO, "v0", make_artifact(tmp_path / "b"), "m")
    with pytest.raises(RevisionExists) as err:
        store.put(REPO, "v0", make_artifact(tmp_path / "c", weights=b"other"), "m")

    assert again == first
    assert "fedem/adapter-hi@v0" in str(err.value)
    assert "changed sub/adapter_model.safetensors" in str(err.value)
    assert manifest(store.get(first)) == manifest(tmp_path / "a")


def test_get_of_a_missing_revision_names_repo_and_revision(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.put(REPO, "v0", make_artifact(tmp_path / "a"), "m")

    with pytest.raises(RevisionNotFound, match=r"'v3' of repo 'fedem/adapter-hi'.*stored revisions: v0"):
        store.get(ArtifactRef(REPO, "v3", "0" * 64))
    with pytest.raises(RevisionNotFound, match="fedem/base"):
        store.local_path(base_repo("fedem"), "main")


def test_a_corrupted_revision_fails_get_and_verify_all_naming_the_file(tmp_path):
    # Prepare
    store = LocalStore(tmp_path / "store")
    ref = store.put(REPO, "v0", make_artifact(tmp_path / "a"), "m")
    (store.local_path(REPO, "v0") / "sub" / "adapter_model.safetensors").write_bytes(b"\x00\x01\x03")

    # Execute
    with pytest.raises(DigestMismatch) as err:
        store.get(ref)
    problems = store.verify_all()

    # Assert
    assert "changed sub/adapter_model.safetensors" in str(err.value)
    assert [(p.kind, p.repo, p.revision) for p in problems] == [("mismatch", REPO, "v0")]
    assert "sub/adapter_model.safetensors" in problems[0].detail


def test_verify_all_compares_with_the_registry_rows(tmp_path):
    store = LocalStore(tmp_path / "store")
    v0 = store.put(REPO, "v0", make_artifact(tmp_path / "a"), "m")
    store.put(REPO, "v1", make_artifact(tmp_path / "b", weights=b"1"), "m")
    known = {(REPO, "v0", "f" * 64), (base_repo("fedem"), "v0", "e" * 64)}

    problems = store.verify_all(known)

    assert problems == [
        Problem("registry-mismatch", REPO, "v0", f"registry digest {'f' * 64}, stored digest {v0.digest}"),
        Problem("orphan", REPO, "v1", problems[1].detail),
        Problem("missing", "fedem/base", "v0", "in the registry but not in the store"),
    ]


@pytest.mark.parametrize("bad", ["fedem", "a/b/c", "fedem/.hidden", "fedem/x y"])
def test_put_refuses_bad_repo_names(tmp_path, bad):
    with pytest.raises(ConfigError, match="org/name"):
        LocalStore(tmp_path).put(bad, "v0", make_artifact(tmp_path / "a"), "m")


def test_put_refuses_main_as_a_revision(tmp_path):
    with pytest.raises(ConfigError, match="main"):
        LocalStore(tmp_path).put(REPO, "main", make_artifact(tmp_path / "a"), "m")


# -- crashes -----------------------------------------------------------------------------------
def _put_and_die_at(tmp_path: Path, call: str) -> None:
    """Run a put in a child process that is SIGKILLed when it reaches `os.<call>`."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from fedem_flwr.hub import store as s
        real = getattr(os, {call!r})
        def die(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        setattr(s.os, {call!r}, die)
        s.LocalStore(Path({str(tmp_path / "store")!r})).put({REPO!r}, "v1", Path({str(tmp_path / "new")!r}), "m")
        """
    )
    make_artifact(tmp_path / "new", weights=b"new")
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


@pytest.mark.slow  # starts a process
def test_a_crash_before_the_rename_leaves_only_a_temporary_folder(tmp_path):
    # Prepare
    store = LocalStore(tmp_path / "store")
    v0 = store.put(REPO, "v0", make_artifact(tmp_path / "a"), "m")

    # Execute
    _put_and_die_at(tmp_path, "rename")

    # Assert
    assert store.revisions(REPO) == ["v0"]
    assert not (tmp_path / "store" / REPO / "v1").exists()
    problems = store.verify_all({(REPO, "v0", v0.digest)})
    assert [p.kind for p in problems] == ["leftover"]
    assert store.put(REPO, "v1", tmp_path / "new", "retry").digest == digest(tmp_path / "new")


@pytest.mark.slow  # starts a process
def test_a_crash_after_the_rename_leaves_an_unrecorded_revision_that_a_retry_adopts(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.put(REPO, "v0", make_artifact(tmp_path / "a"), "m")

    _put_and_die_at(tmp_path, "replace")  # refs.json is written by os.replace, after the rename

    assert store.revisions(REPO) == ["v0"]
    assert [(p.kind, p.revision) for p in store.verify_all()] == [("unrecorded", "v1")]
    with pytest.raises(RevisionExists, match="unrecorded"):
        store.put(REPO, "v1", make_artifact(tmp_path / "other", weights=b"other"), "m")
    ref = store.put(REPO, "v1", tmp_path / "new", "retry")
    assert store.revisions(REPO) == ["v0", "v1"] and store.verify_all() == []
    assert manifest(store.get(ref)) == manifest(tmp_path / "new")


# -- orphans ------------------------------------------------------------------------------------
def test_an_orphan_revision_is_replaced_when_the_caller_knows_the_registry_lacks_it(tmp_path):
    # Prepare: v1 stored, its registry row never committed; the next accepted push has other content
    store = LocalStore(tmp_path / "store")
    store.put(REPO, "v0", make_artifact(tmp_path / "a"), "m")
    store.put(REPO, "v1", make_artifact(tmp_path / "orphan", weights=b"lost"), "m")
    new = make_artifact(tmp_path / "new", weights=b"new")

    # Execute
    with pytest.raises(RevisionExists):
        store.put(REPO, "v1", new, "m")
    ref = store.put(REPO, "v1", new, "m", replace_orphan=True)

    # Assert
    assert ref.digest == digest(new) and manifest(store.get(ref)) == manifest(new)
    assert store.revisions(REPO) == ["v0", "v1"]
    assert store.verify_all() == []  # the orphan's copy moved aside is gone too


@pytest.mark.slow  # starts a process
def test_an_unrecorded_orphan_folder_is_replaced_too(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.put(REPO, "v0", make_artifact(tmp_path / "a"), "m")
    _put_and_die_at(tmp_path, "replace")  # v1 renamed into place, refs.json never written

    ref = store.put(REPO, "v1", make_artifact(tmp_path / "other", weights=b"other"), "m", replace_orphan=True)

    assert manifest(store.get(ref)) == manifest(tmp_path / "other") and store.verify_all() == []


def test_repair_removes_orphans_and_debris_and_keeps_what_the_registry_lists(tmp_path):
    # Prepare: v0 recorded; v1 an orphan; v2 renamed into place only; a put's temporary folder
    store = LocalStore(tmp_path / "store")
    v0 = store.put(REPO, "v0", make_artifact(tmp_path / "a"), "m")
    store.put(REPO, "v1", make_artifact(tmp_path / "b", weights=b"1"), "m")
    (tmp_path / "store" / REPO / "v2").mkdir()
    (tmp_path / "store" / ".tmp" / "fedem--adapter-hi--v3--put-0000").mkdir(parents=True)
    known = {(REPO, "v0", v0.digest)}
    problems = store.verify_all(known)

    # Execute
    removed = store.repair(problems)

    # Assert
    assert [(p.kind, p.revision) for p in removed] == [
        ("unrecorded", "v2"), ("orphan", "v1"), ("leftover", "fedem--adapter-hi--v3--put-0000")]
    assert store.verify_all(known) == [] and store.revisions(REPO) == ["v0"]
    assert store.local_path(REPO, "main").name == "v0"


@pytest.mark.slow  # starts a process
def test_repair_keeps_an_unrecorded_folder_the_registry_lists(tmp_path):
    store = LocalStore(tmp_path / "store")
    v0 = store.put(REPO, "v0", make_artifact(tmp_path / "a"), "m")
    _put_and_die_at(tmp_path, "replace")
    problems = store.verify_all({(REPO, "v0", v0.digest), (REPO, "v1", digest(tmp_path / "new"))})

    assert store.repair(problems) == []
    assert (tmp_path / "store" / REPO / "v1").is_dir()


# -- loading with plain transformers / PEFT ----------------------------------------------------
def test_revision_folders_load_with_plain_transformers_and_peft(tmp_path):
    import peft
    import torch
    import transformers

    # Prepare
    torch.manual_seed(0)
    config = transformers.Mamba2Config(vocab_size=260, hidden_size=32, num_hidden_layers=1, num_heads=4,
                                       head_dim=16, expand=2, state_size=8, n_groups=1)
    model = transformers.Mamba2ForCausalLM(config)
    model.save_pretrained(tmp_path / "base")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["in_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    store = open_store(tmp_path / "hub")

    # Execute
    store.put(base_repo("fedem"), "v0", tmp_path / "base", "seed")
    store.put(REPO, "v0", tmp_path / "adapter", "fresh")
    base = transformers.AutoModelForCausalLM.from_pretrained(store.local_path(base_repo("fedem"), "main"))
    loaded = peft.PeftModel.from_pretrained(base, store.local_path(REPO, "v0"))

    # Assert
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, lora(ids).logits, atol=1e-6)


def test_open_store_rejects_unknown_kinds(tmp_path):
    with pytest.raises(ConfigError, match="`hub.store`"):
        open_store(tmp_path, "s3")
