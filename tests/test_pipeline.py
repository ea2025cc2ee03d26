"""Pipelines of 2 and 4 processes on this machine (gloo): the tokens and logits of one process, each process
reading only its own stage's shards (files and bytes counted), and failures stopping every process in time.

Each test starts plain processes (``pipeline_launch``), not torchrun: nothing but the library stops the
other processes when one dies or fails.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from moe_models import save_moe
from pipeline_launch import base_env, launch
from tiny_models import save_tiny_gpt2, save_tiny_llama

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch was built without torch.distributed / gloo")

IDS = [[0, 0, 5, 6, 7], [9, 10, 11, 12, 13], [4, 5, 6, 7, 8]]  # the first prompt left-padded
MASK = [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 4-layer Llama and a 4-layer GPT-2 (head tied to the embeddings), each in several shards."""
    root = tmp_path_factory.mktemp("pipeline_models")
    return {"llama": save_tiny_llama(root / "llama", sharded=True, layers=4, with_tokenizer=False).path,
            "gpt2": save_tiny_gpt2(root / "gpt2", sharded=True, layers=4, with_tokenizer=False).path,
            "mixtral": save_moe("mixtral", root / "mixtral").path}  # experts stored one by one, fused on load


def _spec(models: dict[str, Path], **extra: object) -> dict:
    return {"models": [{"name": name, "model": str(path), "input_ids": IDS, "attention_mask": MASK,
                        "new_tokens": NEW_TOKENS, "max_memory": {"cpu": "1GiB"}, **extra}
                       for name, path in models.items()]}


def _reference(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One process's tokens and logits, on one thread as the workers run (MoE kernels round per thread count)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids, mask = torch.tensor(IDS), torch.tensor(MASK)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
            return tokens, model(input_ids=ids, attention_mask=mask).logits
    finally:
        torch.set_num_threads(threads)


@functools.cache
def _tensors_of(path: Path) -> dict[str, tuple[str, int]]:
    """Checkpoint key -> (shard file name, bytes), read with safetensors itself."""
    from safetensors import safe_open

    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    found = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(path / shard, "pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                found[key] = (shard, tensor.numel() * tensor.element_size())
    return found


def _expected_reads(path: Path, plan: dict, stage: int) -> dict[str, int]:
    """Bytes each shard must give stage ``stage``: its units' tensors (a tied head reads the embeddings)."""
    units = plan["stages"][stage]["units"] + plan["shared"]
    keys = [k for k in _tensors_of(path) if any(k == u or k.startswith(u + ".") for u in units)]
    if "lm_head" in units and "transformer.wte" not in units and "transformer.wte.weight" in _tensors_of(path):
        keys.append("transformer.wte.weight")  # GPT-2's head is tied to wte, which the checkpoint stores
    reads: dict[str, int] = {}
    for key in keys:
        shard, size = _tensors_of(path)[key]
        reads[shard] = reads.get(shard, 0) + size
    return reads


def _check_run(results, models: dict[str, Path], stages: int) -> None:
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} failed:\n{r.output[-4000:]}"
    for name, path in models.items():
        tokens, logits = _reference(path)
        all_shards = {shard for shard, _ in _tensors_of(path).values()}
        opened_by_all: set[str] = set()
        for r in results:
            got = r.result[name]
            assert torch.equal(got["tokens"], tokens), (name, r.rank, got["tokens"], tokens)
            assert torch.equal(got["logits"], logits), (name, r.rank)
            expected = _expected_reads(path, got["plan"], r.rank)
            read = {Path(file).name: n for file, n in got["read"].items()}
            assert read == expected, (name, r.rank)  # exactly the stage's tensors' bytes
            opened = {Path(file).name for file in got["opened"]}
            assert opened == set(expected), (name, r.rank)  # and no other shard opened
            assert opened != all_shards
            opened_by_all |= opened
        assert opened_by_all == all_shards
        assert len({tuple(map(tuple, (s["blocks"] for s in r.result[name]["plan"]["stages"]))) for r in results}) == 1
        assert len(results[0].result[name]["plan"]["stages"]) == stages


def test_two_processes_give_the_tokens_of_one_and_read_only_their_shards(models, tmp_path, hub):
    """The Llama comes from the (local) Hub, each process with its own cache as on its own host; the
    Mixtral's experts are fused by each stage from its own shards."""
    hub.add_repo("org/tiny-llama", models["llama"])
    spec = _spec(models)
    spec["models"][0]["model"] = "org/tiny-llama"
    env = {**base_env(tmp_path / "unused"), "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"}
    results = launch(2, spec, tmp_path, env=env, rank_env=lambda rank: {"HF_HOME": str(tmp_path / f"host{rank}")})
    _check_run(results, models, 2)
    for r in results:  # each host downloaded the config, the index and its own shards, nothing else
        snapshot, = (tmp_path / f"host{r.rank}" / "hub" / "models--org--tiny-llama" / "snapshots").iterdir()
        own = set(_expected_reads(models["llama"], r.result["llama"]["plan"], r.rank))
        downloaded = {p.name for p in snapshot.iterdir()}
        assert downloaded == {"config.json", "generation_config.json", "model.safetensors.index.json", *own}


def test_four_processes_give_the_tokens_of_one_and_read_only_their_shards(models, tmp_path):
    four = {name: models[name] for name in ("llama", "gpt2")}
    _check_run(launch(4, _spec(four, micro_batches=3), tmp_path), four, 4)


def test_stages_that_do_not_fit_their_process_offload_part_of_it_to_disk(models, tmp_path):
    """Each process's budget holds less than its stage: the rest is streamed from the checkpoint on disk
    by the usual hooks, and the tokens and logits are still exactly one process's."""
    llama = models["llama"]
    results = launch(2, _spec({"llama": llama}, max_memory={"cpu": "20KB"}), tmp_path)
    tokens, logits = _reference(llama)
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} failed:\n{r.output[-4000:]}"
        got = r.result["llama"]
        placed = set(got["device_map"].values())
        assert placed == {"cpu", "disk"}, (r.rank, got["device_map"])  # part resident, part streamed
        assert torch.equal(got["tokens"], tokens), (r.rank, got["tokens"], tokens)
        assert torch.equal(got["logits"], logits), r.rank


def test_a_killed_process_stops_the_others_with_its_rank_in_the_error(models, tmp_path):
    spec = _spec({"llama": models["llama"]}, kill_rank=1, kill_step=2)  # killed in its second forward
    results = launch(3, spec, tmp_path)  # HF_BIGMODEL_PIPELINE_TIMEOUT=300 (pipeline_launch.base_env)
    assert results[1].returncode == -9
    for r in (results[0], results[2]):
        error = r.result["error"]
        assert r.returncode == 3 and error["type"] == "RankFailedError", r.output[-3000:]
        assert error["failed_rank"] == 1 and error["phase"] == "generating"
        assert "lost rank 1" in error["message"] and "killed" in error["message"], error["message"]
        assert error["seconds_in_phase"] < 120  # its closed connection told them, not the 300 s timeout


def test_a_process_that_cannot_load_stops_the_others_with_its_reason(models, tmp_path):
    broken = tmp_path / "llama"
    broken.mkdir()
    for file in models["llama"].iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    last = sorted(broken.glob("model-*.safetensors"))[-1]  # holds the head: only the last stage reads it
    last.write_bytes(last.read_bytes()[:-100])
    results = launch(2, _spec({"llama": broken}), tmp_path)
    assert results[1].returncode == 3 and results[1].result["error"]["type"] == "CorruptCheckpointError"
    error = results[0].result["error"]
    assert results[0].returncode == 3 and error["type"] == "RankFailedError" and error["failed_rank"] == 1
    assert "rank 1" in error["message"] and "CorruptCheckpointError" in error["message"], error["message"]


def _netns_available() -> str | None:
    """Why two network namespaces cannot be made here (None: they can)."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` (apt-get install iproute2)"
    probe = f"hfbm-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], check=False)
    return None


@pytest.fixture
def two_hosts():
    """Two network namespaces ("hosts") joined by a veth pair, 10.77.0.1 and 10.77.0.2."""
    import os
    import subprocess

    why = _netns_available()
    if why is not None:
        pytest.skip(why)
    tag = os.getpid() % 100000
    hosts = [f"hfbm-a{tag}", f"hfbm-b{tag}"]
    links = [f"hfa{tag}", f"hfb{tag}"]

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    try:
        for host in hosts:
            ip("netns", "add", host)
        ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for i, (host, link) in enumerate(zip(hosts, links)):
            ip("link", "set", link, "netns", host)
            ip("-n", host, "addr", "add", f"10.77.0.{i + 1}/24", "dev", link)
            ip("-n", host, "link", "set", link, "up")
            ip("-n", host, "link", "set", "lo", "up")
        yield hosts, links
    finally:
        for host in hosts:
            subprocess.run(["ip", "netns", "delete", host], check=False, capture_output=True)


def test_two_hosts_joined_by_a_network_link_give_the_tokens_of_one(models, tmp_path, two_hosts):
    """Each process in its own network namespace, reaching the other only over a veth pair."""
    hosts, links = two_hosts
    spec = _spec({"llama": models["llama"]})
    results = launch(2, spec, tmp_path, master="10.77.0.1",
                     prefix=lambda rank: ["ip", "netns", "exec", hosts[rank]],
                     rank_env=lambda rank: {"GLOO_SOCKET_IFNAME": links[rank],
                                            "HF_HOME": str(tmp_path / f"host{rank}")})
    _check_run(results, {"llama": models["llama"]}, 2)


def test_a_pre_quantized_checkpoint_is_cut_and_planned_at_the_bytes_it_holds(models, tmp_path, capsys):
    """torchao int8 weights count as their int8 bytes (the shards' headers), not as bfloat16: a budget that
    holds each quantized stage keeps it whole in RAM (at bfloat16 sizes part would go to disk), and the
    pipeline gives from_pretrained's tokens and logits."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig

    from hf_bigmodel.cli import main

    int8 = tmp_path / "int8"
    transformers.AutoModelForCausalLM.from_pretrained(
        models["llama"], quantization_config=transformers.TorchAoConfig(Int8WeightOnlyConfig()), dtype=torch.bfloat16,
    ).save_pretrained(int8)

    def stage_bytes(*argv: str) -> list[int]:
        capsys.readouterr()
        assert main(["plan", *argv, "--stages", "2", "--max-memory", "cpu=1GiB", "--json"]) == 0
        return [stage["bytes"] for stage in json.loads(capsys.readouterr().out)["stages"]]

    quantized, plain = stage_bytes(str(int8)), stage_bytes(str(models["llama"]), "--dtype", "bfloat16")
    budget = max(quantized) + 64  # room for the rotary table every stage keeps
    assert budget < min(plain)
    results = launch(2, _spec({"int8": int8}, max_memory={"cpu": budget}), tmp_path)
    tokens, logits = _reference(int8)
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} failed:\n{r.output[-4000:]}"
        got = r.result["int8"]
        assert set(got["device_map"].values()) == {"cpu"}, (r.rank, got["device_map"])
        assert [s["bytes"] for s in got["plan"]["stages"]] == quantized
        assert torch.equal(got["tokens"], tokens) and torch.equal(got["logits"], logits), r.rank
