"""hub.py against a local Hub-compatible server: exactly the needed files, errors, offline, integrity."""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from hub_server import HubServer, set_hub_offline
from huggingface_hub import constants
from safetensors.torch import load_file
from tiny_models import save_tiny_llama, save_tiny_sd_components, write_junk_files

from hf_bigmodel.errors import (
    CorruptCheckpointError,
    GatedModelError,
    InvalidIndexError,
    ModelFileNotFoundError,
    ModelNotFoundError,
    OfflineCacheMissError,
    RevisionNotFoundError,
)
from hf_bigmodel.hf.hub import ModelFiles, resolve_config, resolve_model_files
from hf_bigmodel.storage.integrity import check_weight_file_sizes, verify_cached_file

REPO = "tiny-org/llama"


@pytest.fixture(scope="module")
def llama_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sharded tiny Llama folder, other frameworks' weights, a README and a torch copy of its weights."""
    path = save_tiny_llama(tmp_path_factory.mktemp("src") / "llama", sharded=True).path
    write_junk_files(path)
    torch_copy = save_tiny_llama(
        tmp_path_factory.mktemp("src") / "torch", sharded=True, safe_serialization=False
    )
    for f in torch_copy.path.glob("pytorch_model*"):
        shutil.copy(f, path / f.name)
    return path


def _shards(folder: Path, index: str = "model.safetensors.index.json") -> list[str]:
    return list(dict.fromkeys(json.loads((folder / index).read_text())["weight_map"].values()))


def _same_bytes(files: ModelFiles, source: Path, subfolder: str = "") -> None:
    for f in (files.config_file, files.checkpoint, *files.weight_files):
        name = f.relative_to(files.folder).as_posix()
        assert f.read_bytes() == (source / subfolder / name).read_bytes(), name


def test_sharded_repo_fetches_config_index_and_named_shards_only(hub: HubServer, llama_sharded: Path) -> None:
    commit = hub.add_repo(REPO, llama_sharded)
    files = resolve_model_files(REPO)

    shards = _shards(llama_sharded)
    assert len(shards) > 2
    assert hub.downloaded_files() == ["config.json", "model.safetensors.index.json", *shards]
    touched = {r.filename for r in hub.requests if r.filename}
    assert touched == {"config.json", "model.safetensors.index.json", *shards}  # not even a HEAD on the rest
    assert files.format == "safetensors" and files.is_sharded
    assert files.repo_id == REPO and files.commit_hash == commit
    assert files.folder == Path(constants.HF_HUB_CACHE) / "models--tiny-org--llama" / "snapshots" / commit
    assert [p.name for p in files.weight_files] == shards
    assert files.checkpoint.name == "model.safetensors.index.json"
    _same_bytes(files, llama_sharded)
    assert files.expected_sizes == {
        str(p): (llama_sharded / p.name).stat().st_size for p in files.weight_files
    }


def test_second_resolve_downloads_nothing_and_transformers_reuses_the_cache(
    hub: HubServer, llama_sharded: Path
) -> None:
    from transformers import AutoModelForCausalLM

    hub.add_repo(REPO, llama_sharded)
    first = resolve_model_files(REPO)
    hub.clear_requests()
    assert resolve_model_files(REPO) == first
    assert hub.downloaded_files() == []

    model = AutoModelForCausalLM.from_pretrained(REPO)
    reference = AutoModelForCausalLM.from_pretrained(llama_sharded)
    assert set(hub.downloaded_files()) <= {"generation_config.json"}  # weights and config came from the cache
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_safetensors_preferred_over_bin(hub: HubServer, tmp_path: Path) -> None:
    path = save_tiny_llama(tmp_path / "st", with_tokenizer=False).path
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    hub.add_repo(REPO, path)
    files = resolve_model_files(REPO)
    assert files.format == "safetensors" and not files.is_sharded
    assert hub.downloaded_files() == ["config.json", "model.safetensors"]


def test_torch_fallback_when_only_bin(hub: HubServer, tmp_path: Path) -> None:
    path = save_tiny_llama(tmp_path / "pt", sharded=True, safe_serialization=False, with_tokenizer=False).path
    write_junk_files(path)
    hub.add_repo(REPO, path)
    files = resolve_model_files(REPO)
    shards = _shards(path, "pytorch_model.bin.index.json")
    assert files.format == "torch"
    assert hub.downloaded_files() == ["config.json", "pytorch_model.bin.index.json", *shards]
    _same_bytes(files, path)


@pytest.mark.parametrize("sharded", [False, True])
def test_diffusers_subfolder(hub: HubServer, tmp_path: Path, sharded: bool) -> None:
    from diffusers import UNet2DConditionModel

    path, components = save_tiny_sd_components(tmp_path / "sd", sharded=sharded)
    commit = hub.add_repo("tiny-org/sd", path)
    files = resolve_model_files("tiny-org/sd", subfolder="unet")
    assert files.subfolder == "unet" and files.commit_hash == commit
    assert files.folder.name == "unet" and files.config_file == files.folder / "config.json"
    if sharded:
        shards = _shards(path / "unet", "diffusion_pytorch_model.safetensors.index.json")
        assert len(shards) > 1 and [p.name for p in files.weight_files] == shards
        expected = ["config.json", "diffusion_pytorch_model.safetensors.index.json", *shards]
    else:
        expected = ["config.json", "diffusion_pytorch_model.safetensors"]
    assert hub.downloaded_files() == [f"unet/{name}" for name in expected]
    _same_bytes(files, path, "unet")

    unet = UNet2DConditionModel.from_pretrained(files.folder)
    for name, tensor in components["unet"].state_dict().items():
        assert torch.equal(unet.state_dict()[name], tensor), name

    index = resolve_config("tiny-org/sd", config_name="model_index.json")
    assert json.loads(index.read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert not any(f.startswith(("vae/", "scheduler/")) for f in hub.downloaded_files())


def test_revision_by_branch_and_by_commit(hub: HubServer, tmp_path: Path) -> None:
    main = save_tiny_llama(tmp_path / "main", with_tokenizer=False, seed=0).path
    v2 = save_tiny_llama(tmp_path / "v2", with_tokenizer=False, seed=1).path
    main_sha = hub.add_repo(REPO, main)
    v2_sha = hub.add_repo(REPO, v2, revision="v2")
    assert main_sha != v2_sha

    files_v2 = resolve_model_files(REPO, revision="v2")
    assert files_v2.commit_hash == v2_sha and files_v2.revision == "v2"
    _same_bytes(files_v2, v2)
    assert {r.revision for r in hub.requests if r.filename} == {"v2", v2_sha}  # config by branch, then pinned

    files_main = resolve_model_files(REPO, revision=main_sha)
    assert files_main.commit_hash == main_sha
    _same_bytes(files_main, main)
    a, b = load_file(files_main.weight_files[0]), load_file(files_v2.weight_files[0])
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])


def test_offline_resolve_uses_the_cache_without_a_request(
    hub: HubServer, llama_sharded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_repo(REPO, llama_sharded)
    online = resolve_model_files(REPO)
    hub.clear_requests()

    assert resolve_model_files(REPO, local_files_only=True) == online
    set_hub_offline(monkeypatch)
    assert resolve_model_files(REPO) == online
    assert resolve_config(REPO) == online.config_file
    assert resolve_model_files(REPO, revision=online.commit_hash).weight_files == online.weight_files
    assert hub.requests == []

    with pytest.raises(OfflineCacheMissError, match="tiny-org/never-seen") as info:
        resolve_model_files("tiny-org/never-seen")
    assert info.value.repo_id == "tiny-org/never-seen" and "HF_HUB_OFFLINE" in str(info.value)
    with pytest.raises(OfflineCacheMissError, match="'v2'"):
        resolve_model_files(REPO, revision="v2")
    assert hub.requests == []


def test_offline_with_a_shard_missing_from_the_cache(hub: HubServer, llama_sharded: Path) -> None:
    hub.add_repo(REPO, llama_sharded)
    files = resolve_model_files(REPO)
    files.weight_files[1].unlink()
    with pytest.raises(OfflineCacheMissError, match=files.weight_files[1].name) as info:
        resolve_model_files(REPO, local_files_only=True)
    assert info.value.filename == files.weight_files[1].name


def test_local_folder_needs_no_server(llama_sharded: Path, tmp_path: Path) -> None:
    files = resolve_model_files(llama_sharded)
    assert files.repo_id is None and files.commit_hash is None and files.folder == llama_sharded
    assert [p.name for p in files.weight_files] == _shards(llama_sharded)
    assert (
        resolve_model_files(str(llama_sharded), weight_names=["pytorch_model.bin.index.json"]).format
        == "torch"
    )
    assert resolve_config(llama_sharded) == llama_sharded / "config.json"

    with pytest.raises(ModelNotFoundError, match="no local folder"):
        resolve_model_files(tmp_path / "nowhere")
    copy = shutil.copytree(llama_sharded, tmp_path / "broken")
    (copy / _shards(llama_sharded)[-1]).unlink()
    with pytest.raises(ModelFileNotFoundError, match=_shards(llama_sharded)[-1]):
        resolve_model_files(copy)


def test_unknown_repo(hub: HubServer) -> None:
    with pytest.raises(ModelNotFoundError, match="'tiny-org/missing'") as info:
        resolve_model_files("tiny-org/missing")
    assert isinstance(info.value, FileNotFoundError) and info.value.repo_id == "tiny-org/missing"
    assert "token=" in str(info.value)


def test_unknown_revision(hub: HubServer, llama_sharded: Path) -> None:
    hub.add_repo(REPO, llama_sharded)
    with pytest.raises(RevisionNotFoundError, match="'no-such-branch'") as info:
        resolve_model_files(REPO, revision="no-such-branch")
    assert info.value.revision == "no-such-branch" and REPO in str(info.value)


def test_missing_files(hub: HubServer, tmp_path: Path) -> None:
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    write_junk_files(folder)
    hub.add_repo("tiny-org/noweights", folder)
    with pytest.raises(ModelFileNotFoundError, match="model.safetensors") as info:
        resolve_model_files("tiny-org/noweights")
    assert "tf_model.h5" in str(info.value) and "tiny-org/noweights" in str(info.value)  # says what is there
    assert hub.downloaded_files() == ["config.json"]

    with pytest.raises(ModelFileNotFoundError, match="'params.json'") as info:
        resolve_model_files("tiny-org/noweights", config_name="params.json")
    assert info.value.filename == "params.json" and "README.md" in str(info.value)


def test_gated_repo(hub: HubServer, llama_sharded: Path) -> None:
    hub.add_repo(REPO, llama_sharded, gated=True)
    with pytest.raises(GatedModelError, match="hf auth login") as info:
        resolve_model_files(REPO)
    assert (
        isinstance(info.value, PermissionError) and info.value.repo_id == REPO and "token=" in str(info.value)
    )
    with pytest.raises(GatedModelError, match="token given has no access"):
        resolve_model_files(REPO, token="hf_wrong")

    files = resolve_model_files(REPO, token=hub.token)
    assert len(files.weight_files) == len(_shards(llama_sharded))
    assert {r.authorization for r in hub.requests if r.status == 200} == {f"Bearer {hub.token}"}


@pytest.mark.parametrize(
    "bad", ["../outside.safetensors", "/etc/passwd.safetensors", "sub/../../x.safetensors", "model-00001.bin"]
)
def test_index_pointing_outside_its_folder_is_rejected(hub: HubServer, tmp_path: Path, bad: str) -> None:
    path = save_tiny_llama(tmp_path / "evil", sharded=True, with_tokenizer=False).path
    index = json.loads((path / "model.safetensors.index.json").read_text())
    first_key = next(iter(index["weight_map"]))
    index["weight_map"][first_key] = bad
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    hub.add_repo(REPO, path)
    with pytest.raises(InvalidIndexError, match="model.safetensors.index.json") as info:
        resolve_model_files(REPO)
    assert bad in str(info.value)
    assert hub.downloaded_files() == ["config.json", "model.safetensors.index.json"]  # no shard fetched
    with pytest.raises(InvalidIndexError, match="model.safetensors.index.json"):
        resolve_model_files(path)


def test_interrupted_download_resumes_with_a_range_request(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    # huggingface_hub only resumes from whole chunks it has written: shrink them to see a Range request.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # its pause before resuming
    path = save_tiny_llama(tmp_path / "one", with_tokenizer=False).path
    assert (path / "model.safetensors").stat().st_size > 4 * 4096
    hub.add_repo(REPO, path)
    hub.fail_next_download("model.safetensors", after_bytes=3 * 4096 + 100)

    files = resolve_model_files(REPO)

    gets = [r for r in hub.requests if r.method == "GET" and r.filename == "model.safetensors"]
    assert [(r.status, r.interrupted, r.range) for r in gets] == [
        (200, True, None),
        (206, False, "bytes=12288-"),
    ]
    assert files.weight_files[0].read_bytes() == (path / "model.safetensors").read_bytes()
    verify_cached_file(files.weight_files[0])


def test_corrupted_cached_blob_is_detected(hub: HubServer, llama_sharded: Path, tmp_path: Path) -> None:
    hub.add_repo(REPO, llama_sharded)
    files = resolve_model_files(REPO)
    assert all(
        verify_cached_file(p) for p in (files.config_file, *files.weight_files)
    )  # sha1 and sha256 blobs
    assert verify_cached_file(llama_sharded / "config.json") is False  # not a cache blob: nothing to compare

    victim = files.weight_files[1]
    blob = victim.resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="force_download=True") as info:
        verify_cached_file(victim)
    assert str(victim) in str(info.value) and blob.name[:16] in str(info.value)


def test_check_weight_file_sizes(hub: HubServer, llama_sharded: Path, tmp_path: Path) -> None:
    hub.add_repo(REPO, llama_sharded)
    files = resolve_model_files(REPO)
    check_weight_file_sizes(files.weight_files, expected_sizes=files.expected_sizes)

    short = tmp_path / "short.safetensors"
    short.write_bytes(files.weight_files[0].read_bytes()[:-10])
    torch_file = tmp_path / "w.bin"
    torch.save({"w": torch.ones(64)}, torch_file)
    check_weight_file_sizes([torch_file])
    torch_file.write_bytes(torch_file.read_bytes()[:-30])
    wrong = {str(files.weight_files[1]): files.expected_sizes[str(files.weight_files[1])] + 1}
    with pytest.raises(CorruptCheckpointError) as info:
        check_weight_file_sizes([short, torch_file, files.weight_files[1]], expected_sizes=wrong)
    message = str(info.value)
    assert message.startswith("3 weight file(s)")
    assert "short.safetensors" in message and "w.bin" in message and files.weight_files[1].name in message


def test_server_ranges_tree_and_errors(hub: HubServer, llama_sharded: Path) -> None:
    commit = hub.add_repo(REPO, llama_sharded)
    served = hub.file(REPO, "config.json").data

    def get(path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(hub.url + path, headers=headers)
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    status, headers, body = get(f"/{REPO}/resolve/main/config.json", Range="bytes=5-9")
    assert (status, body, headers["Content-Range"]) == (206, served[5:10], f"bytes 5-9/{len(served)}")
    assert headers["X-Repo-Commit"] == commit
    assert get(f"/{REPO}/resolve/main/config.json", Range="bytes=-4")[2] == served[-4:]
    assert get(f"/{REPO}/resolve/main/config.json", Range=f"bytes={len(served)}-")[0] == 416
    status, _, body = get(f"/api/models/{REPO}/tree/main?recursive=true")
    assert {e["path"] for e in json.loads(body)} == {p.name for p in llama_sharded.iterdir()}
    assert get(f"/{REPO}/resolve/main/nope")[1]["X-Error-Code"] == "EntryNotFound"
    assert get("/tiny-org/none/resolve/main/config.json")[1]["X-Error-Code"] == "RepoNotFound"


def test_server_logs_each_request_before_its_answer_leaves(
    hub: HubServer, llama_sharded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    import hub_server

    hub.add_repo(REPO, llama_sharded)

    class StallingWriter:  # the server thread stalls after every write, as under heavy CPU load
        def __init__(self, raw: Any) -> None:
            self.raw = raw

        def write(self, data: bytes) -> int:
            written = self.raw.write(data)
            time.sleep(0.1)
            return written

        def __getattr__(self, name: str) -> Any:
            return getattr(self.raw, name)

    setup = hub_server._Handler.setup

    def stalling_setup(handler: Any) -> None:
        setup(handler)
        handler.wfile = StallingWriter(handler.wfile)

    monkeypatch.setattr(hub_server._Handler, "setup", stalling_setup)
    asked = [
        ("HEAD", f"/{REPO}/resolve/main/config.json", 200),
        ("GET", f"/{REPO}/resolve/main/config.json", 200),
        ("GET", f"/api/models/{REPO}", 200),
        ("GET", f"/{REPO}/resolve/main/nope.json", 404),
    ]
    for method, path, status in asked:
        hub.clear_requests()
        try:
            with urllib.request.urlopen(urllib.request.Request(hub.url + path, method=method)) as response:
                response.read()
        except urllib.error.HTTPError as err:
            err.read()
        # The client holds the whole answer: the request must be in the log now, not a moment later.
        assert [(r.method, r.path, r.status) for r in hub.requests] == [(method, path, status)]


def test_unreachable_hub_falls_back_to_the_cache(
    hub: HubServer, llama_sharded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    hub.add_repo(REPO, llama_sharded)
    online = resolve_model_files(REPO)
    hub.stop()
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # huggingface_hub backs off between retries
    assert resolve_model_files(REPO) == online
    with pytest.raises(OfflineCacheMissError, match="Could not reach") as info:
        resolve_model_files("tiny-org/other")
    assert info.value.repo_id == "tiny-org/other" and info.value.filename == "config.json"


def test_cache_dir_is_honoured_online_and_offline(
    hub: HubServer, llama_sharded: Path, tmp_path: Path
) -> None:
    hub.add_repo(REPO, llama_sharded)
    cache = tmp_path / "my-cache"
    files = resolve_model_files(REPO, cache_dir=cache)
    assert (
        files.folder.is_relative_to(cache)
        and not (Path(constants.HF_HUB_CACHE) / "models--tiny-org--llama").exists()
    )
    hub.clear_requests()
    assert resolve_model_files(REPO, cache_dir=cache, local_files_only=True) == files
    assert hub.requests == []
    with pytest.raises(OfflineCacheMissError, match="config.json"):
        resolve_model_files(REPO, local_files_only=True)  # the default cache is empty


@pytest.mark.parametrize("factory", ["llama", "gpt2", "t5", "bert"])
def test_tiny_model_factories_round_trip(tmp_path: Path, factory: str) -> None:
    import tiny_models
    import transformers

    save = getattr(tiny_models, f"save_tiny_{factory}")
    path, ref = save(tmp_path / factory, sharded=True, safe_serialization=factory != "bert")
    assert sum(f.stat().st_size for f in path.iterdir()) < 2**20
    files = resolve_model_files(path)
    assert files.is_sharded and files.format == ("torch" if factory == "bert" else "safetensors")
    loaded = getattr(transformers, type(ref).__name__).from_pretrained(path).eval()
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    extra = {"decoder_input_ids": ids} if factory == "t5" else {}
    with torch.no_grad():
        a, b = ref(input_ids=ids, **extra)[0], loaded(input_ids=ids, **extra)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    if factory == "gpt2":
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
