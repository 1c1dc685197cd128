"""The local Hub endpoint, exercised with the real huggingface_hub, transformers, PEFT and datasets clients."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, HfFileSystem, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.support.hf_server import hub_environment, serve_hub

TINY = dict(vocab_size=260, hidden_size=32, num_hidden_layers=1, num_heads=4, head_dim=16, expand=2,
            state_size=8, n_groups=1)


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def test_create_upload_tag_download_round_trip(local_hub, tmp_path):
    # Prepare
    api = HfApi(endpoint=local_hub.endpoint, token="unused")
    files = {"config.json": b'{"a": 1}', "weights/model.safetensors": bytes(range(256)) * 40}
    src = write_files(tmp_path / "src", files)

    # Execute
    api.create_repo("org/model")
    api.create_repo("org/model", exist_ok=True)
    commit = api.upload_folder(repo_id="org/model", folder_path=src, commit_message="v0",
                               commit_description="fedem-digest: abc")
    api.create_tag("org/model", tag="v0", revision=commit.oid)
    path = snapshot_download("org/model", revision="v0", endpoint=local_hub.endpoint, cache_dir=tmp_path / "cache")

    # Assert
    assert tree(Path(path)) == {**files, ".gitattributes": tree(Path(path))[".gitattributes"]}
    refs = api.list_repo_refs("org/model")
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v0", commit.oid)]
    assert [b.target_commit for b in refs.branches if b.name == "main"] == [commit.oid]
    assert api.list_repo_commits("org/model", revision="v0")[0].message == "fedem-digest: abc"
    assert api.model_info("org/model").sha == commit.oid
    assert api.file_exists("org/model", "config.json") and not api.file_exists("org/model", "nope.json")
    assert [m.id for m in api.list_models(author="org")] == ["org/model"]


def test_an_unchanged_upload_makes_no_commit_and_deletions_apply(local_hub, tmp_path):
    api = HfApi(endpoint=local_hub.endpoint)
    api.create_repo("org/m")
    src = write_files(tmp_path / "src", {"a.txt": b"a", "b.txt": b"b"})
    first = api.upload_folder(repo_id="org/m", folder_path=src, commit_message="one")

    again = api.upload_folder(repo_id="org/m", folder_path=src, commit_message="two")
    (src / "b.txt").unlink()
    third = api.upload_folder(repo_id="org/m", folder_path=src, commit_message="three", delete_patterns="*")

    assert again.oid == first.oid
    assert sorted(api.list_repo_files("org/m")) == [".gitattributes", "a.txt"]
    assert third.oid != first.oid


def test_commit_ids_are_content_addressed(tmp_path):
    src = write_files(tmp_path / "src", {"a.txt": b"same bytes"})
    oids = []
    for _ in range(2):
        with serve_hub() as hub:
            api = HfApi(endpoint=hub.endpoint)
            api.create_repo("org/m")
            oids.append(api.upload_folder(repo_id="org/m", folder_path=src, commit_message="m").oid)
    assert oids[0] == oids[1]


def test_missing_repo_revision_and_file_are_the_clients_typed_errors(local_hub, tmp_path):
    api = HfApi(endpoint=local_hub.endpoint)
    api.create_repo("org/m")
    cache = tmp_path / "cache"

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/absent")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/m", revision="v9")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/m", "absent.txt", endpoint=local_hub.endpoint, cache_dir=cache)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("org/m")
    assert err.value.response.status_code == 409
    api.create_tag("org/m", tag="v0")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_tag("org/m", tag="v0")
    assert err.value.response.status_code == 409


def test_byte_ranges_serve_partial_reads(local_hub, tmp_path):
    api = HfApi(endpoint=local_hub.endpoint)
    api.create_repo("org/data", repo_type="dataset")
    data = bytes(range(256)) * 4
    api.upload_file(path_or_fileobj=data, path_in_repo="blob.bin", repo_id="org/data", repo_type="dataset")

    with HfFileSystem(endpoint=local_hub.endpoint).open("datasets/org/data/blob.bin", "rb", block_size=16) as f:
        f.seek(300)
        part = f.read(20)
    reply = httpx.get(f"{local_hub.endpoint}/datasets/org/data/resolve/main/blob.bin", headers={"Range": "bytes=-5"})

    assert part == data[300:320]
    assert reply.status_code == 206 and reply.content == data[-5:]
    assert reply.headers["Content-Range"] == f"bytes {len(data) - 5}-{len(data) - 1}/{len(data)}"


def test_hub_environment_points_libraries_there_and_restores(tmp_path):
    import datasets.config
    import huggingface_hub.constants as constants
    import huggingface_hub.hf_api

    before = (constants.ENDPOINT, datasets.config.HF_ENDPOINT, huggingface_hub.hf_api.api.endpoint)
    with hub_environment("http://127.0.0.1:1", tmp_path, offline=True):
        assert constants.ENDPOINT == datasets.config.HF_ENDPOINT == huggingface_hub.hf_api.api.endpoint
        assert constants.HF_HUB_CACHE == str(tmp_path / "hub") and constants.HF_HUB_OFFLINE
    assert (constants.ENDPOINT, datasets.config.HF_ENDPOINT, huggingface_hub.hf_api.api.endpoint) == before


# -- the libraries that load by repo id ----------------------------------------------------------
def test_transformers_model_and_tokenizer_load_by_repo_id(hf_env, tmp_path):
    import torch
    import transformers

    from fedem_flwr.model.tokenizer import build_byte_tokenizer

    # Prepare
    torch.manual_seed(0)
    model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**TINY))
    model.save_pretrained(tmp_path / "base")
    build_byte_tokenizer().save_pretrained(tmp_path / "base")
    api = HfApi(endpoint=hf_env.endpoint)
    api.create_repo("org/tiny")
    commit = api.upload_folder(repo_id="org/tiny", folder_path=tmp_path / "base", commit_message="seed")
    api.create_tag("org/tiny", tag="v0", revision=commit.oid)

    # Execute
    loaded = transformers.AutoModelForCausalLM.from_pretrained("org/tiny", revision="v0")
    tokenizer = transformers.AutoTokenizer.from_pretrained("org/tiny")

    # Assert
    ids = torch.tensor([tokenizer("नमस्ते")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "नमस्ते"


def test_a_peft_adapter_loads_by_repo_id_with_its_base_from_the_same_hub(hf_env, tmp_path):
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    base = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**TINY))
    base.save_pretrained(tmp_path / "base")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["in_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/base"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    api = HfApi(endpoint=hf_env.endpoint)
    for repo, folder in (("org/base", "base"), ("org/adapter-hi", "adapter")):
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=tmp_path / folder, commit_message=folder)

    loaded = peft.AutoPeftModelForCausalLM.from_pretrained("org/adapter-hi")

    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, lora(ids).logits, atol=1e-6)


def test_dataset_repos_load_with_load_dataset(hf_env, tmp_path):
    import datasets

    # Prepare
    rows = [{"text": t, "language": lang} for t, lang in (("hello", "en"), ("नमस्ते", "hi"), ("வணக்கம்", "ta"))]
    jsonl = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode()
    parquet = tmp_path / "train.parquet"
    datasets.Dataset.from_list(rows).to_parquet(parquet)
    api = HfApi(endpoint=hf_env.endpoint)
    api.create_repo("org/chat-jsonl", repo_type="dataset")
    api.upload_file(path_or_fileobj=jsonl, path_in_repo="train.jsonl", repo_id="org/chat-jsonl",
                    repo_type="dataset")
    api.create_repo("org/chat-parquet", repo_type="dataset")
    api.upload_file(path_or_fileobj=parquet, path_in_repo="data/train-00000-of-00001.parquet",
                    repo_id="org/chat-parquet", repo_type="dataset")

    # Execute
    from_jsonl = datasets.load_dataset("org/chat-jsonl")
    from_parquet = datasets.load_dataset("org/chat-parquet", split="train")

    # Assert
    assert from_jsonl["train"].to_list() == rows
    assert from_parquet.to_list() == rows
