"""Peak memory under ``max_memory={"cpu": B}``: loading and generating stay within the budget formula.

A fresh subprocess (so the high-water mark is its own) measures its RSS after importing torch and
transformers and building the empty model (the runtime's baseline), then loads a ~200 MB random Llama
with most of it offloaded to disk, generates, and reports ``VmHWM``. The bound is the README's formula::

    peak RSS <= baseline + B + prefetch memory (largest group + window; without prefetching: the largest
                offloaded device-map entry) + activations (SLACK: logits, KV cache, allocator and kernel scratch)

The checkpoint's pages must not pile up in the page cache either (O_DIRECT reads of offloaded weights,
dropped pages behind the loader's reads of RAM-resident ones).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from page_cache import cached_bytes

BUDGET = 48 * 2**20
#: Activations and what the allocator and the kernels keep beside them: 22-31 MiB measured here (peak RSS less
#: the baseline, the weights in RAM and the prefetch buffers).
SLACK = 32 * 2**20
LAYERS = 8

CHILD = r"""
import json, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
from hf_bigmodel import init_empty_weights, load_checkpoint_and_dispatch
from hf_bigmodel.runtime.prefetch import prefetch_depth, prefetcher_of

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out

ckpt, budget, prefetch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
config = AutoConfig.from_pretrained(ckpt)
with init_empty_weights():
    model = AutoModelForCausalLM.from_config(config)
ids = torch.randint(3, config.vocab_size, (1, 16))
baseline = status()["VmRSS"]
model = load_checkpoint_and_dispatch(model, ckpt, device_map="auto", max_memory={"cpu": budget},
                                     no_split_module_classes=["LlamaDecoderLayer"], dtype=torch.bfloat16,
                                     prefetch=prefetch)
after_load = status()["VmRSS"]
with torch.no_grad():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4,
                         min_new_tokens=4, pad_token_id=0)
entries = {}
for name, device in model.hf_device_map.items():
    module = model.get_submodule(name)
    entries.setdefault(device, []).append(sum(p.numel() * 2 for p in module.parameters()))
fetcher = prefetcher_of(model)
print(json.dumps({
    "baseline": baseline, "after_load": after_load, "peak": status()["VmHWM"],
    "largest_disk_entry": max(entries.get("disk", [0])), "disk_bytes": sum(entries.get("disk", [])),
    "depth": prefetch_depth(prefetch), "stats": fetcher.stats() if fetcher else None,
    "tokens": out[0, 16:].tolist(),
}))
"""


def _write_checkpoint(path: Path) -> None:
    """A random bf16 Llama (~200 MB) in 3 safetensors shards, written without instantiating the model."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=LAYERS,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    path.mkdir()
    config.save_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(0)
    shapes = {k: v.shape for k, v in model.state_dict().items() if "rotary" not in k}
    names = list(shapes)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 3], names[len(names) // 3 : 2 * len(names) // 3],
                              names[2 * len(names) // 3 :])):
        file = f"model-{i + 1:05d}-of-00003.safetensors"
        tensors = {}
        for name in part:
            tensors[name] = (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16)
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            weight_map[name] = file
        save_file(tensors, path / file)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _evict(files: list[Path]) -> None:
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    ckpt = tmp_path_factory.mktemp("budget") / "llama"
    _write_checkpoint(ckpt)
    return ckpt


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status and uses mincore")
@pytest.mark.parametrize("prefetch", [2, 0])
def test_peak_rss_of_capped_load_and_generation_stays_within_the_formula(checkpoint, prefetch):
    ckpt = checkpoint
    shards = sorted(ckpt.glob("*.safetensors"))
    _evict(shards)
    can_evict = cached_bytes(shards) < 2**20  # false on tmpfs, where the file *is* page cache
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    env.pop("HF_BIGMODEL_PREFETCH", None)
    env["HF_BIGMODEL_DISABLE_PROGRESS_BARS"] = "1"
    # The reads that bypass the page cache (this machine's free RAM would let them keep their pages:
    # tests/test_prefetch.py checks that mode).
    env["HF_BIGMODEL_PAGE_CACHE"] = "0"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(BUDGET), str(prefetch)],
                          capture_output=True, check=False, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    depth, largest = report["depth"], report["largest_disk_entry"]
    assert report["disk_bytes"] > 100 * 2**20, report  # most of the model is on disk
    if prefetch:
        assert report["stats"]["hits"] > 0 and report["stats"]["misses"] == 0, report
    else:
        assert report["stats"] is None
    held = report["stats"]["memory_bound"] if prefetch else largest
    assert held <= (depth + 1) * largest + 4 * 2**20, report["stats"]  # buffers rounded up to 2 MiB each
    bound = report["baseline"] + BUDGET + held + SLACK
    mib = {k: round(v / 2**20, 1) for k, v in report.items() if isinstance(v, int) and k != "depth"}
    print("MIB", {k: round(v / 2**20, 1) for k, v in report.items() if isinstance(v, int)}, report["stats"])
    assert report["peak"] <= bound, f"peak RSS over the formula bound {bound / 2**20:.1f} MiB: {mib}"
    # Tighter: beyond the budget, only the prefetch buffers (and 64 MiB of activations and allocator slack).
    pool = report["stats"]["buffer_bytes"] if prefetch else 0
    assert report["peak"] <= report["baseline"] + BUDGET + pool + 64 * 2**20, (mib, report["stats"])
    if can_evict:
        cached = cached_bytes(shards)
        total = sum(f.stat().st_size for f in shards)
        assert cached < 0.05 * total, f"{cached / 2**20:.1f} MiB of the {total / 2**20:.1f} MiB checkpoint cached"
