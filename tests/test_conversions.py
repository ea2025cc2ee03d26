"""transformers' weight conversions: MoE checkpoints (per-expert keys) into fused experts, compared with from_pretrained.

Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V3, built tiny with random weights and saved by
``save_pretrained`` (which writes one tensor per expert), are loaded in RAM, with part on disk, and in
bf16, and must equal transformers' own ``from_pretrained`` exactly. Conversions that only move elements
read on-disk experts straight from the checkpoint's shards (nothing copied); others (a registered
``Transpose``) are converted once into the offload folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.core_model_loading")

from moe_models import MOE_FAMILIES, save_moe
from tiny_models import save_tiny_llama

from hf_bigmodel import load_pretrained_dispatched
from hf_bigmodel.errors import OffloadError
from hf_bigmodel.load.conversions import Assembler
from hf_bigmodel.load.loading import OFFLOAD_ATTR
from hf_bigmodel.storage.fused import FusedDiskTensor

PROMPT = torch.tensor([[1, 7, 12, 30, 4, 9, 100, 64]])


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {family: save_moe(family, root / family).path for family in MOE_FAMILIES}


@pytest.fixture(scope="module")
def references() -> dict:
    """transformers' own loads, shared by the tests of one family and dtype."""
    return {}


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def assert_same(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    assert [(n, p.dtype, tuple(p.shape)) for n, p in ours.named_parameters()] == \
        [(n, p.dtype, tuple(p.shape)) for n, p in ref.named_parameters()]
    with torch.no_grad():
        torch.testing.assert_close(ours(PROMPT).logits, ref(PROMPT).logits, rtol=0, atol=0)
    greedy = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
    assert torch.equal(ours.generate(PROMPT, **greedy), ref.generate(PROMPT, **greedy))


def fused(model: torch.nn.Module) -> dict[str, FusedDiskTensor]:
    weights = getattr(model, OFFLOAD_ATTR, None)
    return {n: r for n, r in (weights.disk.items() if weights else ()) if isinstance(r, FusedDiskTensor)}


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("mode", ["ram", "disk", "bf16-disk"])
def test_moe_checkpoints_load_as_from_pretrained(moe: dict[str, Path], references: dict, family: str, mode: str,
                                                 tmp_path: Path) -> None:
    path = moe[family]
    dtype = torch.bfloat16 if mode.startswith("bf16") else None
    if (family, dtype) not in references:
        references[(family, dtype)] = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    ref = references[(family, dtype)]
    if mode == "ram":
        ours = load_pretrained_dispatched(path, device_map="cpu")
        assert not fused(ours)
    else:
        budget = int(weight_bytes(path) * 0.6 * (0.5 if dtype else 1))
        ours = load_pretrained_dispatched(path, dtype=dtype, max_memory={"cpu": budget},
                                          offload_folder=tmp_path / "offload")
        assert "disk" in ours.hf_device_map.values()
        on_disk = fused(ours)
        assert on_disk and all(n.endswith(("gate_up_proj", "down_proj")) for n in on_disk)
        assert all(ref.dtype == (dtype or torch.float32) for ref in on_disk.values())
        assert not list((tmp_path / "offload").glob("*.safetensors"))  # read in place: nothing copied
    assert_same(ours, ref)


def test_experts_on_disk_are_byte_ranges_of_the_checkpoint(moe: dict[str, Path], tmp_path: Path) -> None:
    path = moe["mixtral"]
    offload = tmp_path / "offload"
    ours = load_pretrained_dispatched(path, device_map={"": "disk"}, offload_folder=offload)
    refs = fused(ours)
    assert len(refs) == 2 * 3  # gate_up_proj and down_proj of 3 layers
    shards = {str(p) for p in path.glob("*.safetensors")}
    gate_up = refs["model.layers.1.mlp.experts.gate_up_proj"]
    assert len(gate_up.pieces) == 2 * 4 and {p.entry.path for p in gate_up.pieces} <= shards
    assert {p.entry.key.rsplit(".", 2)[-2] for p in gate_up.pieces} == {"w1", "w3"}
    assert [f.name for f in offload.iterdir()] == ["index.json"]  # only the index: no weights copied
    index = json.loads((offload / "index.json").read_text())["weights"]
    assert len(index["model.layers.1.mlp.experts.gate_up_proj"]["pieces"]) == 8
    assert_same(ours, transformers.AutoModelForCausalLM.from_pretrained(path))


def test_fused_experts_reload_from_the_offload_index(moe: dict[str, Path], tmp_path: Path) -> None:
    """dispatch_model(offload_dir=...) on a fresh empty model finds the fused experts through index.json."""
    from hf_bigmodel import dispatch_model, init_empty_weights

    path = moe["qwen3_moe"]
    offload = tmp_path / "offload"
    load_pretrained_dispatched(path, device_map={"": "disk"}, offload_folder=offload)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path)
    with init_empty_weights():
        empty = transformers.AutoModelForCausalLM.from_config(ref.config)
    model = dispatch_model(empty, {"": "disk"}, offload_dir=offload)
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, ref(PROMPT).logits)


def test_peak_memory_in_ram_is_the_model_plus_one_shard(tmp_path: Path) -> None:
    """Experts are fused in place as shards stream: RSS grows by the loaded model and about one shard."""
    saved = save_moe("mixtral", tmp_path / "big", shard_size="8MB",
                     config={"hidden_size": 256, "intermediate_size": 1024, "num_local_experts": 8,
                             "num_hidden_layers": 2, "vocab_size": 256})
    del saved
    save_moe("mixtral", tmp_path / "small", shard_size="64KB")  # loaded first: imports and first-call costs
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    script = textwrap.dedent(f"""
        import torch, transformers
        from hf_bigmodel import load_pretrained_dispatched
        import gc
        # What is measured is the load, not the modules it imports (compiled on a fresh machine) nor first calls.
        load_pretrained_dispatched({str(tmp_path / "small")!r}, device_map="cpu")
        gc.collect()

        def status(field):
            line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
            return int(line.split()[1]) * 1024

        open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from the current RSS
        before = status("VmRSS")
        model = load_pretrained_dispatched({str(tmp_path / "big")!r}, device_map="cpu")
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        print(size, status("VmHWM") - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    size, grown = map(int, out.stdout.split()[-2:])
    shard = max(f.stat().st_size for f in (tmp_path / "big").glob("*.safetensors"))
    assert size > 40 * 2**20  # big enough that a second copy of the experts (one layer: 25 MiB) would show
    assert grown < size + shard + 12 * 2**20, (size, shard, grown)


# -- the layout derived from transformers' operations equals what its converters compute -------------------------

def _converters() -> Iterator[tuple[str, object, dict[str, list[tuple[str, tuple[int, ...]]]], str]]:
    from transformers.core_model_loading import Chunk, Concatenate, MergeModulelist, Split, WeightConverter

    experts = {p: [(f"m.experts.{i}.{p}.weight", (4, 6)) for i in range(3)] for p in ("w1", "w3")}
    yield ("merge", WeightConverter("experts.*.w1.weight", "experts.down", [MergeModulelist(dim=0)]),
           {"experts.*.w1.weight": experts["w1"]}, "m.experts.down")
    yield ("merge+concat",
           WeightConverter(["experts.*.w1.weight", "experts.*.w3.weight"], "experts.gate_up",
                           [MergeModulelist(dim=0), Concatenate(dim=1)]),
           {"experts.*.w1.weight": experts["w1"], "experts.*.w3.weight": experts["w3"]}, "m.experts.gate_up")
    yield ("concat-dim1", WeightConverter(["a.weight", "b.weight"], "ab.weight", [Concatenate(dim=1)]),
           {"a.weight": [("m.a.weight", (4, 6))], "b.weight": [("m.b.weight", (4, 2))]}, "m.ab.weight")
    yield ("chunk-dim0", WeightConverter("qkv.weight", ["q.weight", "k.weight", "v.weight"], [Chunk(dim=0)]),
           {"qkv.weight": [("m.qkv.weight", (9, 4))]}, "m.q.weight")
    yield ("chunk-dim1", WeightConverter("gu.weight", ["g.weight", "u.weight"], [Chunk(dim=1)]),
           {"gu.weight": [("m.gu.weight", (3, 8))]}, "m.g.weight")
    yield ("split", WeightConverter("qkv.weight", ["q.weight", "k.weight", "v.weight"], [Split(dim=0)]),
           {"qkv.weight": [("m.qkv.weight", (8, 4))]}, "m.q.weight")


class _Shapes(torch.nn.Module):
    """Just what ``Split`` asks of a model: its parameters' shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.m = torch.nn.Module()
        for name, rows in (("q", 4), ("k", 2), ("v", 2)):
            lin = torch.nn.Linear(4, rows, bias=False, device="meta")
            setattr(self.m, name, lin)


@pytest.mark.parametrize("case", list(_converters()), ids=lambda c: c[0])
def test_layout_of_each_operation_equals_transformers_converter(case: tuple) -> None:
    from hf_bigmodel.hf.conversions import _conversion, _run
    from hf_bigmodel.storage.checkpoint import TensorInfo

    _, converter, sources, first = case
    keys = {pattern: [k for k, _ in items] for pattern, items in sources.items()}
    infos = {k: TensorInfo(k, shape, torch.float32, "f") for items in sources.values() for k, shape in items}
    torch.manual_seed(0)
    tensors = {k: torch.randn(info.shape) for k, info in infos.items()}
    model = _Shapes()
    expected = _run(converter, keys, tensors, first, model, None)
    conv = _conversion(converter, keys, infos, first, model, None, lambda key, target: None)
    assert conv.is_layout, conv.label
    built = {}
    assembler = Assembler([conv], lambda name: torch.empty(expected[name].shape))
    for key, tensor in tensors.items():
        built.update(assembler.feed(key, tensor))
    assert built.keys() == expected.keys()
    for name in expected:
        assert torch.equal(built[name], expected[name]), name


def test_an_operation_that_reorders_elements_runs_transformers_converter() -> None:
    from transformers.core_model_loading import Transpose, WeightConverter

    from hf_bigmodel.hf.conversions import _conversion
    from hf_bigmodel.storage.checkpoint import TensorInfo

    converter = WeightConverter("w_t", "w.weight", [Transpose(0, 1)])
    infos = {"m.w_t": TensorInfo("m.w_t", (3, 5), torch.float32, "f")}
    conv = _conversion(converter, {"w_t": ["m.w_t"]}, infos, "m.w.weight", torch.nn.Module(), None,
                       lambda key, target: None)
    assert not conv.is_layout and conv.shapes == {"m.w.weight": (5, 3)}
    value = torch.arange(15.0).view(3, 5)
    assert torch.equal(Assembler([conv], torch.empty).feed("m.w_t", value)["m.w.weight"], value.T)


# -- conversions registered by users: a computation (Transpose) and a Split, on a tiny Llama --------------------

@pytest.fixture
def registered() -> Iterator[object]:
    """Register conversions for "llama" as a user would, and remove them afterwards."""
    from transformers import conversion_mapping as cm

    def register(transforms: list) -> None:
        cm.register_checkpoint_conversion_mapping("llama", transforms, overwrite=True)

    yield register
    cm._checkpoint_conversion_mapping_cache.pop("llama", None)
    cm.USER_REGISTERED_MAPPINGS.discard("llama")


def _rewrite(path: Path, change) -> None:  # noqa: ANN001
    state = load_file(path / "model.safetensors")
    save_file(change(state), path / "model.safetensors", metadata={"format": "pt"})


def test_a_conversion_that_is_not_a_layout_is_converted_once_into_the_offload_folder(
        tmp_path: Path, registered) -> None:  # noqa: ANN001
    from transformers.core_model_loading import Transpose, WeightConverter

    path = save_tiny_llama(tmp_path / "llama").path
    _rewrite(path, lambda s: {(k.replace("mlp.up_proj.weight", "mlp.up_proj_t") if "up_proj" in k else k):
                              (v.T.contiguous() if "up_proj" in k else v) for k, v in s.items()})
    registered([WeightConverter("mlp.up_proj_t", "mlp.up_proj.weight", [Transpose(0, 1)])])
    ref = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert_same(load_pretrained_dispatched(path, device_map="cpu"), ref)
    with pytest.raises(OffloadError, match="offload_folder="):
        load_pretrained_dispatched(path, device_map={"": "disk"})
    offload = tmp_path / "offload"
    ours = load_pretrained_dispatched(path, device_map={"": "disk"}, offload_folder=offload)
    assert_same(ours, ref)
    written = sorted(offload.glob("*.safetensors"))
    assert len(written) == 2  # one per layer: the converted up_proj, nothing else copied
    stamps = [f.stat().st_mtime_ns for f in written]
    assert_same(load_pretrained_dispatched(path, device_map={"": "disk"}, offload_folder=offload), ref)
    assert [f.stat().st_mtime_ns for f in sorted(offload.glob("*.safetensors"))] == stamps  # re-used


def test_a_split_on_disk_reads_byte_ranges_of_the_fused_tensor(tmp_path: Path, registered) -> None:  # noqa: ANN001
    from transformers.core_model_loading import Split, WeightConverter

    path = save_tiny_llama(tmp_path / "llama").path

    def fuse(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {k: v for k, v in state.items() if not k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))}
        for layer in range(2):
            p = f"model.layers.{layer}.self_attn."
            out[p + "qkv.weight"] = torch.cat([state[p + n + "_proj.weight"] for n in "qkv"])
        return out

    _rewrite(path, fuse)
    registered([WeightConverter("self_attn.qkv.weight", ["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                         "self_attn.v_proj.weight"], [Split(dim=0)])])
    ref = transformers.AutoModelForCausalLM.from_pretrained(path)
    ours = load_pretrained_dispatched(path, device_map={"": "disk"}, offload_folder=tmp_path / "offload")
    k = fused(ours)["model.layers.0.self_attn.k_proj.weight"]
    assert len(k.pieces) == 1 and k.pieces[0].source_range().nbytes == 16 * 8 * 4  # its rows, not the whole qkv
    assert not list((tmp_path / "offload").glob("*.safetensors"))
    assert_same(ours, ref)


# -- reading fused tensors whose pieces are strided, directly and through the prefetcher ----------------------

def test_fused_tensors_with_strided_pieces_read_exactly(tmp_path: Path) -> None:
    from hf_bigmodel.runtime.prefetch_reader import Job, fetch, plan_group
    from hf_bigmodel.storage.direct_io import DirectReader, aligned_empty
    from hf_bigmodel.storage.fused import DiskPiece
    from hf_bigmodel.storage.offload_folder import OffloadFolder, load_offload_index
    from hf_bigmodel.storage.safetensors_io import read_header
    from hf_bigmodel.storage.weights_map import WeightsMap

    a, b = torch.arange(24.0).view(4, 6), 100 + torch.arange(8.0).view(4, 2)
    save_file({"a": a, "b": b}, tmp_path / "w.safetensors")
    entries = read_header(tmp_path / "w.safetensors").entries
    # [4, 5]: columns 1..4 of a (a strided box of the file) then b's first column (strided too)
    ref = FusedDiskTensor((DiskPiece(entries["a"], ((0, 4), (0, 4)), ((0, 4), (1, 5))),
                           DiskPiece(entries["b"], ((0, 4), (4, 5)), ((0, 4), (0, 1)))), (4, 5), torch.float64)
    expected = torch.cat([a[:, 1:5], b[:, :1]], dim=1).double()
    weights = WeightsMap(disk={"w": ref})
    assert torch.equal(weights["w"], expected)

    from hf_bigmodel.runtime.streaming import StreamedUnit  # what plan_group reads from an offloading hook

    group = plan_group(0, [(0, StreamedUnit("m", ("w",), weights, torch.device("cpu")))], on_cpu=True)
    job = Job(group.items, type("Buf", (), {"tensor": aligned_empty(group.host_bytes)})(), group)
    assert torch.equal(fetch(job, DirectReader(), torch.device("cpu"), None)[0], expected)

    folder = OffloadFolder(tmp_path / "offload")
    folder.prepare()
    folder.write_index({"w": ref})
    assert load_offload_index(tmp_path / "offload", expected={"w": (4, 5)}) == {"w": ref}

    # The CUDA path's assembly, run on the CPU with staging chunks smaller than a piece.
    from hf_bigmodel.runtime.prefetch_cuda import to_device as _to_device
    from hf_bigmodel.storage.direct_io import ALIGNMENT

    class Staging:
        chunk = ALIGNMENT
        buffers = [aligned_empty(2 * ALIGNMENT)]

        def acquire(self) -> torch.Tensor:
            return self.buffers[0]

        def release(self, stream: object) -> None:
            pass

    stacked = FusedDiskTensor(tuple(DiskPiece(entries["a"], ((i, i + 1), (0, 4), (0, 6)), ((0, 4), (0, 6)))
                                    for i in range(2)), (2, 4, 6), torch.float32)
    assert torch.equal(_to_device(stacked, DirectReader(), Staging(), torch.device("cpu"), None), torch.stack([a, a]))
    assert torch.equal(_to_device(ref, DirectReader(), Staging(), torch.device("cpu"), None), expected)
