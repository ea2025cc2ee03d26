import pytest
import torch
from core_models import TinyLM

from hf_bigmodel import InvalidMaxMemoryError, compute_module_sizes, find_tied_parameters, init_empty_weights
from hf_bigmodel.errors import DeviceMapError, summarize
from hf_bigmodel.model.dtypes import matches_module, resolve_dtype, target_dtype
from hf_bigmodel.model.naming import is_within, lookup, owner
from hf_bigmodel.model.sizes import format_size, parse_size
from hf_bigmodel.plan.devices import normalize_device, torch_device
from hf_bigmodel.plan.memory import get_max_memory


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10GiB", 10 * 2**30),
        ("10GB", 10 * 10**9),
        ("500MB", 500 * 10**6),
        ("1.5GiB", int(1.5 * 2**30)),
        ("1.5 GiB", int(1.5 * 2**30)),
        ("2kib", 2048),
        ("8Gb", 10**9),  # bits, as accelerate reads them
        ("1024", 1024),
        ("0", 0),
        (4096, 4096),
        (1e3, 1000),
    ],
)
def test_parse_size_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-1GiB", -5, "10 parsecs", "", float("nan"), True, None])
def test_parse_size_rejects_with_the_value_named(bad):
    with pytest.raises(ValueError, match="Invalid size"):
        parse_size(bad)


def test_format_size():
    assert format_size(512) == "512 B"
    assert format_size(int(1.5 * 2**30)) == "1.50 GiB"


def test_normalize_device_forms():
    assert normalize_device("cuda:1") == 1
    assert normalize_device(torch.device("cuda", 2)) == 2
    assert normalize_device("3") == 3
    assert normalize_device("CPU") == "cpu"
    assert normalize_device("disk") == "disk"
    assert normalize_device("cuda") == 0
    assert torch_device(1) == torch.device("cuda", 1)
    for bad in ("meta", "tpu", -1, "cuda:x"):
        with pytest.raises(DeviceMapError):
            normalize_device(bad)


def test_get_max_memory_default_measures_ram():
    budgets = get_max_memory()
    assert budgets["cpu"] > 0
    assert list(budgets)[-1] == "cpu"


def _cgroups(tmp_path, proc: str, files: dict[str, str]):
    """A fake ``/proc/self/cgroup`` and cgroup mount under ``tmp_path``; returns ``_cgroup_available``'s answer."""
    from hf_bigmodel.plan.memory import _cgroup_available

    (tmp_path / "proc").write_text(proc)
    for name, value in files.items():
        (tmp_path / "sys" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "sys" / name).write_text(value)
    return _cgroup_available(tmp_path / "proc", tmp_path / "sys")


V1_ROOT = {"memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "5000000000\n"}


@pytest.mark.parametrize(
    ("proc", "files", "expected"),
    [
        # v1, a job's child cgroup (no namespace): its own limit, not the root's "no limit"
        ("4:memory:/jobs/run1\n0::/\n", {**V1_ROOT, "memory/jobs/run1/memory.limit_in_bytes": "800000000",
                                          "memory/jobs/run1/memory.usage_in_bytes": "150000000"}, 650_000_000),
        # v1, the parent's limit is the tighter one
        ("4:memory:/jobs/run1\n", {**V1_ROOT, "memory/jobs/memory.limit_in_bytes": "500000000",
                                   "memory/jobs/memory.usage_in_bytes": "400000000",
                                   "memory/jobs/run1/memory.limit_in_bytes": "800000000",
                                   "memory/jobs/run1/memory.usage_in_bytes": "150000000"}, 100_000_000),
        # v1 container that mounts only its own cgroup: the path is not there, the mount's files are its
        ("11:memory:/docker/abc\n", {"memory/memory.limit_in_bytes": "2000000000",
                                     "memory/memory.usage_in_bytes": "500000000"}, 1_500_000_000),
        # v2, nested, usage over the limit counts as nothing left
        ("0::/user.slice/job\n", {"cgroup.controllers": "memory", "memory.max": "max",
                                   "user.slice/job/memory.max": "1000", "user.slice/job/memory.current": "1200"}, 0),
        # v2 with a cgroup namespace: the mount's root is the process's cgroup
        ("0::/\n", {"cgroup.controllers": "memory", "memory.max": "3000000000", "memory.current": "1000000000"},
         2_000_000_000),
        # no limit anywhere, and no cgroup file at all
        ("4:memory:/a\n0::/\n", V1_ROOT, None),
        ("0::/\n", {}, None),
    ],
    ids=["v1-child", "v1-parent-tighter", "v1-container", "v2-nested-over", "v2-namespace", "no-limit", "no-files"],
)
def test_cgroup_limits_of_the_process_own_cgroup_and_its_ancestors_bind(tmp_path, proc, files, expected):
    assert _cgroups(tmp_path, proc, files) == expected


def test_get_max_memory_orders_and_parses():
    budgets = get_max_memory({"cpu": "1GiB", "disk": "10GB", 1: 5, "cuda:0": "2GiB"}, check_devices=False)
    assert budgets == {0: 2 * 2**30, 1: 5, "cpu": 2**30, "disk": 10**10}
    assert list(budgets) == [0, 1, "cpu", "disk"]


@pytest.mark.parametrize(
    ("budget", "culprit"),
    [({"cpu": -1}, "-1"), ({"cpu": "lots"}, "lots"), ({"tpu": "1GiB"}, "tpu"), ({5: "1GiB"}, "5")],
)
def test_get_max_memory_errors_name_the_entry(budget, culprit):
    if torch.cuda.device_count() > 5 and culprit == "5":
        pytest.skip("this machine has a GPU 5")
    with pytest.raises(InvalidMaxMemoryError, match=culprit):
        get_max_memory(budget)


def test_compute_module_sizes_counts_buffers_dtype_and_ties_once():
    with init_empty_weights():
        model = TinyLM(dim=16, depth=2, vocab=50)
    sizes = compute_module_sizes(model)
    block = (16 * 32 + 32 + 32 * 16 + 16) * 4 + 16 * 4 * 2  # params + two buffers, fp32
    assert sizes["blocks.0"] == block
    assert sizes["embed"] == 50 * 16 * 4
    assert "head" not in sizes or sizes.get("head", 0) == 0  # tied: counted under embed only
    assert sizes[""] == sizes["embed"] + sizes["blocks"] + sizes["norm"]
    half = compute_module_sizes(model, dtype=torch.float16)
    assert half["embed"] == 50 * 16 * 2
    special = compute_module_sizes(model, dtype="fp16", special_dtypes={"norm.weight": torch.float32})
    assert special["norm"] == 16 * 4 + 16 * 2


def test_find_tied_parameters():
    with init_empty_weights():
        model = TinyLM()
    assert find_tied_parameters(model) == [["embed.weight", "head.weight"]]


def test_prefix_matcher():
    table = {"model.layers.3": 0, "model": "cpu", "": "disk"}
    assert owner("model.layers.3.mlp.weight", table) == "model.layers.3"
    assert owner("model.layers.30.mlp.weight", table) == "model"  # not fooled by a shared text prefix
    assert lookup("lm_head.weight", table) == "disk"
    assert owner("x", {"y"}) is None
    with pytest.raises(KeyError):
        lookup("x", {"y": 1})
    assert is_within("a.b.c", "a.b") and not is_within("a.bc", "a.b") and is_within("z", "")


def test_dtype_helpers():
    assert resolve_dtype("fp16") is torch.float16
    assert resolve_dtype("torch.bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="Unknown dtype"):
        resolve_dtype("float17")
    assert matches_module("encoder.block.0.layer.1.DenseReluDense.wo.weight", ["wo"])
    assert not matches_module("two.weight", ["wo"])
    assert target_dtype("a.wo.weight", torch.float32, torch.float16, ["wo"]) is torch.float32
    assert target_dtype("a.wi.weight", torch.float32, torch.float16, ["wo"]) is torch.float16
    assert target_dtype("ids", torch.int64, torch.float16) is torch.int64
    assert target_dtype("a.wo.weight", torch.bfloat16, None, ["wo"]) is torch.bfloat16


def test_summarize_cuts_long_lists():
    assert summarize(range(12)) == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9 (+2 more)"


def test_a_process_in_a_memory_cgroup_plans_within_its_limit(monkeypatch, tmp_path):
    """On this machine's real cgroup files: a process put in a child cgroup of 600 MB (as a job runner or the
    benchmark does) gets a default CPU budget under 600 MB, not the machine's free RAM."""
    import subprocess
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import system

    group, why = system.MemoryCgroup.create(f"hfbm_test_{tmp_path.name[-12:]}", limit=600 * 10**6)
    if group is None:
        pytest.skip(f"no memory cgroup to make here: {why}")
    try:
        code = "from hf_bigmodel.plan.memory import get_max_memory; print(get_max_memory(None)['cpu'])"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=group.join,
                              timeout=120)
    finally:
        group.remove()
    assert done.returncode == 0, done.stderr
    assert 0 < int(done.stdout) < 600 * 10**6
