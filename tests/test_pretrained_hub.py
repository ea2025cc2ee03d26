"""load_pretrained_dispatched with Hub repo ids, against the local Hub-compatible test server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hub_server import HubServer, set_hub_offline
from tiny_models import save_tiny_llama, save_tiny_sd_components, write_junk_files

from hf_bigmodel import load_pretrained_dispatched
from hf_bigmodel.errors import (
    GatedModelError,
    ModelClassNotFoundError,
    ModelFileNotFoundError,
    ModelNotFoundError,
    OfflineCacheMissError,
    RevisionNotFoundError,
)

transformers = pytest.importorskip("transformers")

REPO = "tiny-org/llama"
PROMPT = torch.tensor([[1, 7, 12, 30, 4, 9]])


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sharded tiny Llama with a tokenizer, other frameworks' weights, a README and torch copies of the shards."""
    path = save_tiny_llama(tmp_path_factory.mktemp("src") / "llama", sharded=True).path
    write_junk_files(path)
    torch_copy = save_tiny_llama(tmp_path_factory.mktemp("src") / "bin", sharded=True, safe_serialization=False)
    for f in torch_copy.path.glob("pytorch_model*"):
        shutil.copy(f, path / f.name)
    return path


def shards(folder: Path) -> list[str]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return list(dict.fromkeys(index["weight_map"].values()))


def budget(folder: Path) -> dict[str, int]:
    return {"cpu": int(sum(f.stat().st_size for f in folder.glob("*.safetensors")) * 0.75)}


def logits_and_greedy(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(PROMPT).logits
    return logits, model.generate(PROMPT, max_new_tokens=5, min_new_tokens=5, do_sample=False)


def test_repo_id_downloads_only_what_it_needs_then_loads_offline(hub: HubServer, llama: Path, monkeypatch):
    hub.add_repo(REPO, llama)
    reference = transformers.AutoModelForCausalLM.from_pretrained(llama)
    expected = logits_and_greedy(reference)

    model = load_pretrained_dispatched(REPO, max_memory=budget(llama))
    needed = {"config.json", "generation_config.json", "model.safetensors.index.json", *shards(llama)}
    assert len(shards(llama)) > 1
    assert set(hub.downloaded_files()) == needed and len(hub.downloaded_files()) == len(needed)
    assert {r.filename for r in hub.requests if r.filename} <= needed  # not even a HEAD on the rest
    assert {"cpu", "disk"} <= set(model.hf_device_map.values())
    assert model.config.name_or_path == REPO
    got = logits_and_greedy(model)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert torch.equal(got[1], expected[1])

    hub.clear_requests()
    assert torch.equal(logits_and_greedy(load_pretrained_dispatched(REPO, local_files_only=True))[1], expected[1])
    set_hub_offline(monkeypatch)
    offline = load_pretrained_dispatched(REPO, max_memory=budget(llama))
    assert hub.requests == []
    torch.testing.assert_close(logits_and_greedy(offline)[0], expected[0], rtol=0, atol=0)
    with pytest.raises(OfflineCacheMissError, match="tiny-org/never-downloaded"):
        load_pretrained_dispatched("tiny-org/never-downloaded")


def test_revision_selects_the_weights(hub: HubServer, llama: Path, tmp_path: Path):
    hub.add_repo(REPO, llama)
    other = save_tiny_llama(tmp_path / "v2", seed=7).path
    v2_commit = hub.add_repo(REPO, other, revision="v2")
    reference = transformers.AutoModelForCausalLM.from_pretrained(other)
    for revision in ("v2", v2_commit):
        model = load_pretrained_dispatched(REPO, revision=revision)
        torch.testing.assert_close(model.lm_head.weight, reference.lm_head.weight, rtol=0, atol=0)


def test_diffusers_component_from_a_pipeline_repo(hub: HubServer, tmp_path: Path):
    diffusers = pytest.importorskip("diffusers")
    pipeline = save_tiny_sd_components(tmp_path / "pipe").path
    hub.add_repo("tiny-org/sd", pipeline)
    model = load_pretrained_dispatched("tiny-org/sd", subfolder="vae", max_memory=budget(pipeline / "vae"))
    assert set(hub.downloaded_files()) == {"vae/config.json", "vae/diffusion_pytorch_model.safetensors"}
    assert {"cpu", "disk"} <= set(model.hf_device_map.values())
    reference = diffusers.AutoencoderKL.from_pretrained(pipeline, subfolder="vae")
    image = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.encode(image).latent_dist.mean, reference.encode(image).latent_dist.mean,
                                   rtol=1e-5, atol=1e-5)


def test_unknown_repo_and_revision(hub: HubServer, llama: Path):
    with pytest.raises(ModelNotFoundError, match="'tiny-org/nothing-here'") as info:
        load_pretrained_dispatched("tiny-org/nothing-here")
    assert info.value.repo_id == "tiny-org/nothing-here"
    hub.add_repo(REPO, llama)
    with pytest.raises(RevisionNotFoundError, match="'no-such-branch'.*tiny-org/llama") as info:
        load_pretrained_dispatched(REPO, revision="no-such-branch")
    assert info.value.revision == "no-such-branch"
    assert hub.downloaded_files() == []


def test_missing_weights_are_named_with_what_the_repo_holds(hub: HubServer, llama: Path, tmp_path: Path):
    folder = tmp_path / "noweights"
    folder.mkdir()
    shutil.copy(llama / "config.json", folder / "config.json")
    write_junk_files(folder)
    hub.add_repo("tiny-org/noweights", folder)
    with pytest.raises(ModelFileNotFoundError, match="model.safetensors") as info:
        load_pretrained_dispatched("tiny-org/noweights")
    assert "tiny-org/noweights" in str(info.value) and "tf_model.h5" in str(info.value)
    assert hub.downloaded_files() == ["config.json"]


def test_unknown_class_fails_before_any_weight_is_downloaded(hub: HubServer, llama: Path, tmp_path: Path):
    folder = shutil.copytree(llama, tmp_path / "renamed")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["LlamaForMindReading"]
    (folder / "config.json").write_text(json.dumps(config))
    hub.add_repo("tiny-org/renamed", folder)
    with pytest.raises(ModelClassNotFoundError, match=r"'LlamaForMindReading'.*transformers"):
        load_pretrained_dispatched("tiny-org/renamed")
    assert hub.downloaded_files() == ["config.json"]


def test_gated_repo_needs_a_token(hub: HubServer, llama: Path):
    hub.add_repo(REPO, llama, gated=True)
    with pytest.raises(GatedModelError, match=r"tiny-org/llama.*gated.*token=") as info:
        load_pretrained_dispatched(REPO)
    assert isinstance(info.value, PermissionError) and info.value.repo_id == REPO
    model = load_pretrained_dispatched(REPO, token=hub.token, max_memory=budget(llama))
    reference = transformers.AutoModelForCausalLM.from_pretrained(llama)
    torch.testing.assert_close(logits_and_greedy(model)[0], logits_and_greedy(reference)[0], rtol=0, atol=0)
