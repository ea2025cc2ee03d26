"""Adversarial cases on the acting side: a dispatched model computes with the weights planned, or raises.

Weight files that change under a running model, hooks removed and attached again, dispatch and
``disk_offload`` failing half way: each case ends either in exactly the reference output or in a clear
error that leaves the model as it was. Cases that could crash (a file truncated under a reader) run in a
child process with a memory cap and a timeout (``adversarial.run_isolated``).
"""

from __future__ import annotations

import json

import pytest
import torch
from adversarial import run_isolated
from core_models import TinyLM, empty_lm, reference_tiny_lm, save_state
from torch import nn

from hf_bigmodel import (
    disk_offload,
    dispatch_model,
    load_checkpoint_in_model,
    remove_hook_from_submodules,
)
from hf_bigmodel.load.loading import OFFLOAD_ATTR
from hf_bigmodel.model.tensors import model_tensors

IDS = torch.tensor([[1, 5, 9, 3], [7, 2, 0, 4]])


# --- checkpoint files read in place that change under a dispatched model ----------------------------------


def test_a_checkpoint_read_in_place_that_changes_after_dispatch_is_an_error_at_the_next_forward(tmp_path):
    """Re-saved (offsets move), overwritten in place (same size) or truncated, with and without prefetching:
    the next forward raises FileChangedError naming the file, never computes with other bytes. (A re-save
    writes a new file: a reader that still holds the old one open reads exactly the planned bytes.)"""
    ref = reference_tiny_lm()
    save_state(ref, tmp_path / "ckpt")
    result = run_isolated(f"""
        import os, shutil, torch
        from safetensors.torch import save_file
        from core_models import TinyLM, reference_tiny_lm
        from hf_bigmodel import FileChangedError, init_empty_weights, load_checkpoint_and_dispatch

        ids = torch.tensor({IDS.tolist()})
        ref = reference_tiny_lm()
        expected = ref(ids)
        state = {{k: v for k, v in ref.state_dict().items() if k != "head.weight"}}

        def resave(file):
            save_file(state, file, metadata={{"note": "x" * 40}})  # same tensors, every offset moved

        def overwrite(file):
            size = os.path.getsize(file)
            with open(file, "r+b") as f:  # same inode, same size, other bytes after the header
                f.seek(size // 2)
                f.write(os.urandom(size - size // 2))

        def truncate(file):
            with open(file, "r+b") as f:
                f.truncate(os.path.getsize(file) // 2)

        out = {{}}
        for change in (resave, overwrite, truncate):
            for prefetch in (None, 0):  # the prefetcher's reader keeps the file open; without it, opened per read
                device_map = {{"embed": "cpu", "blocks": "disk", "norm": "disk", "head": "cpu"}}
                folder = {str(tmp_path)!r} + f"/run-{{change.__name__}}-{{prefetch}}"
                shutil.copytree({str(tmp_path / "ckpt")!r}, folder)
                file = folder + "/model.safetensors"
                with init_empty_weights():
                    model = TinyLM()
                model = load_checkpoint_and_dispatch(model, folder, device_map=device_map, prefetch=prefetch)
                first = torch.equal(model(ids), expected)  # files opened and read once: the readers hold them
                change(file)
                try:  # a file replaced by a new one (a new inode) may still be read as planned, from the old one
                    outcome = "as planned" if torch.equal(model(ids), expected) else "other weights"
                except FileChangedError as err:
                    outcome = "named" if file in str(err) and "changed after it was planned" in str(err) else str(err)
                except Exception as err:
                    outcome = f"{{type(err).__name__}}: {{err}}"
                out[f"{{change.__name__}} prefetch={{prefetch}}"] = [first, outcome]
        report(out)
    """)
    assert all(first and outcome in ("named", "as planned") for first, outcome in result.values()), result
    assert all(outcome == "named" for case, (_, outcome) in result.items() if not case.startswith("resave")), result
    assert len(result) == 6


# --- hooks removed, hooks attached twice ------------------------------------------------------------------


class RootScaled(nn.Module):
    """A model with a parameter of its own at the root (as some heads keep a logit scale or bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = TinyLM()
        self.bias = nn.Parameter(torch.zeros(50))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids) + self.bias


def reference_root_scaled() -> RootScaled:
    torch.manual_seed(3)
    model = RootScaled().eval()
    with torch.no_grad():
        model.bias.uniform_(-1, 1)
    return model


def plain(model: nn.Module) -> bool:
    """No hook on any module, no weights map, no device map: a model as torch built it."""
    return (all("_hf_hook" not in m.__dict__ and "_old_forward" not in m.__dict__ for m in model.modules())
            and OFFLOAD_ATTR not in model.__dict__ and "hf_device_map" not in model.__dict__)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("device_map", [{"": "disk"}, {"lm": "disk", "bias": "cpu"}, {"lm.embed": "cpu", "lm.blocks": "disk",
                                                                                     "lm.norm": "cpu", "lm.head": "cpu",
                                                                                     "bias": "disk"}])
def test_remove_hook_from_submodules_gives_back_a_plain_complete_model(tmp_path, device_map):
    """Root parameters back from the meta device, the root's hook gone, no stale weights map: disk_offload of
    the same model afterwards works and computes the reference."""
    ref = reference_root_scaled()
    expected = ref(IDS)
    model = reference_root_scaled()
    dispatch_model(model, device_map, offload_dir=tmp_path / "first")
    assert torch.equal(model(IDS), expected)
    remove_hook_from_submodules(model)
    assert plain(model)
    assert not [k for k, v in model.state_dict().items() if v.device.type == "meta"]
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    assert model.lm.head.weight is model.lm.embed.weight  # tied again: one parameter
    assert torch.equal(model(IDS), expected)
    disk_offload(model, tmp_path / "second", execution_device="cpu")
    assert torch.equal(model(IDS), expected)
    remove_hook_from_submodules(model)
    assert plain(model) and torch.equal(model(IDS), expected)


def test_remove_hook_from_submodules_reads_weights_loading_left_on_disk(tmp_path):
    """``"disk"`` entries of a device map loaded without dispatch live only in the weights map: read back."""
    ref = reference_tiny_lm()
    save_state(ref, tmp_path / "ckpt")
    model = empty_lm()
    load_checkpoint_in_model(model, tmp_path / "ckpt", device_map={"embed": "cpu", "blocks": "disk", "norm": "cpu",
                                                                   "head": "cpu"})
    remove_hook_from_submodules(model)
    assert plain(model) and torch.equal(model(IDS), ref(IDS))


def hooks_of(module: nn.Module) -> list[object]:
    """The hooks on ``module`` itself, a chain's one by one."""
    hook = module.__dict__.get("_hf_hook")
    return [] if hook is None else list(getattr(hook, "hooks", [hook]))


def hook_counts(model: nn.Module) -> dict[str, int]:
    return {name: len(hooks_of(m)) for name, m in model.named_modules() if hooks_of(m)}


@pytest.mark.parametrize("second", [{"": "disk"}, {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "disk",
                                                   "blocks.2": "disk", "blocks.3": "cpu", "norm": "cpu", "head": "cpu"},
                                    {"": "cpu"}])
def test_dispatch_model_twice_replaces_the_hooks(tmp_path, second):
    ref = reference_tiny_lm()
    expected = ref(IDS)
    model = reference_tiny_lm()
    dispatch_model(model, {"embed": "cpu", "blocks": "disk", "norm": "disk", "head": "cpu"}, offload_dir=tmp_path / "a")
    once = hook_counts(model)
    assert torch.equal(model(IDS), expected)
    dispatch_model(model, second, offload_dir=tmp_path / "b", force_hooks=second != {"": "cpu"})
    assert all(n == 1 for n in hook_counts(model).values()), hook_counts(model)
    if second == {"": "cpu"}:
        assert plain(model) or not hook_counts(model)
    elif second == {"": "disk"}:
        assert hook_counts(model).keys() >= once.keys()
    assert torch.equal(model(IDS), expected)
    assert model.hf_device_map == second


def test_dispatch_model_twice_keeps_hooks_that_are_not_its_own(tmp_path):
    from hf_bigmodel import ModelHook, add_hook_to_module

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    model = reference_tiny_lm()
    add_hook_to_module(model.norm, Count())
    for _ in range(2):
        dispatch_model(model, {"embed": "cpu", "blocks": "disk", "norm": "disk", "head": "cpu"},
                       offload_dir=tmp_path / "a")
    assert [type(h).__name__ for h in hooks_of(model.norm)] == ["Count", "AlignDevicesHook"]
    assert torch.equal(model(IDS), reference_tiny_lm()(IDS)) and Count.calls == 1


# --- failing half way leaves the model as it was ----------------------------------------------------------


def snapshot(model: nn.Module) -> dict[str, object]:
    """What must be unchanged after a failed call: every slot's object, data pointer and device, the hooks."""
    slots = model_tensors(model, persistent_only=False)
    return {"tensors": {n: (id(s.tensor), s.tensor.device.type, s.tensor.data_ptr() if s.tensor.device.type != "meta"
                            else None) for n, s in slots.items()},
            "hooks": {n: [id(h) for h in hooks_of(m)] for n, m in model.named_modules()},
            "attrs": {k: id(model.__dict__.get(k)) for k in (OFFLOAD_ATTR, "hf_device_map")}}


class DiskFull(OSError):
    pass


def fail_on_write(monkeypatch, at: int) -> list[int]:
    """Make the ``at``-th offload-folder write (0-based) fail as a full disk does."""
    from hf_bigmodel.storage.offload_folder import OffloadFolder

    calls: list[int] = []
    original = OffloadFolder.write

    def write(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > at:
            raise DiskFull(28, "No space left on device (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OffloadFolder, "write", write)
    return calls


@pytest.mark.parametrize("dispatched", [False, True])
def test_disk_offload_failing_half_way_leaves_the_model_as_it_was(tmp_path, monkeypatch, dispatched):
    ref = reference_tiny_lm()
    expected = ref(IDS)
    model = reference_tiny_lm()
    if dispatched:  # a model already dispatched: its hooks and weights map must survive too
        dispatch_model(model, {"embed": "cpu", "blocks": "cpu", "norm": "disk", "head": "cpu"},
                       offload_dir=tmp_path / "a", force_hooks=True)
    before = snapshot(model)
    calls = fail_on_write(monkeypatch, at=3)
    with pytest.raises(DiskFull):
        disk_offload(model, tmp_path / "off", execution_device="cpu")
    assert len(calls) == 4  # three modules written, the fourth failed
    assert snapshot(model) == before
    assert torch.equal(model(IDS), expected)
    monkeypatch.undo()
    disk_offload(model, tmp_path / "off", execution_device="cpu")  # and it can still be offloaded
    assert torch.equal(model(IDS), expected)


def test_disk_offload_past_the_file_size_limit_leaves_the_model_as_it_was(tmp_path):
    """For real: RLIMIT_FSIZE lets the first modules' files through and fails a later one (EFBIG)."""
    result = run_isolated(f"""
        import signal, torch
        from core_models import reference_tiny_lm
        from hf_bigmodel import OffloadError, disk_offload
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        ids = torch.tensor({IDS.tolist()})
        model = reference_tiny_lm(dim=64)
        expected = model(ids)
        params = {{n: (id(p), p.data_ptr()) for n, p in model.named_parameters()}}
        try:
            disk_offload(model, {str(tmp_path / "off")!r}, execution_device="cpu")
            outcome = "written"
        except OffloadError as err:
            outcome = "File too large" in str(err)
        written = sorted(p.name for p in __import__("pathlib").Path({str(tmp_path / "off")!r}).glob("*.safetensors"))
        same = params == {{n: (id(p), p.data_ptr()) for n, p in model.named_parameters()}}
        report([outcome, len(written) > 0, same, torch.equal(model(ids), expected)])
    """, file_size=20_000)
    assert result == [True, True, True, True], result


@pytest.mark.parametrize("step", ["write", "hooks"])
def test_dispatch_failing_half_way_leaves_the_model_as_it_was(tmp_path, monkeypatch, step):
    from hf_bigmodel.runtime import dispatch as dispatch_module

    ref = reference_tiny_lm()
    expected = ref(IDS)
    model = reference_tiny_lm()
    dispatch_model(model, {"embed": "cpu", "blocks": "disk", "norm": "cpu", "head": "cpu"}, offload_dir=tmp_path / "a")
    before = snapshot(model)
    weights = getattr(model, OFFLOAD_ATTR)
    held = (dict(weights.memory), dict(weights.disk))
    if step == "write":
        fail_on_write(monkeypatch, at=1)
        failure: type[BaseException] = DiskFull
    else:
        def refuse(*args, **kwargs):
            raise KeyboardInterrupt  # an interrupt while the hooks go on

        monkeypatch.setattr(dispatch_module.Prefetcher, "create", refuse)
        failure = KeyboardInterrupt
    with pytest.raises(failure):
        dispatch_model(model, {"embed": "disk", "blocks.0": "disk", "blocks.1": "cpu", "blocks.2": "disk",
                               "blocks.3": "cpu", "norm": "disk", "head": "disk"}, offload_dir=tmp_path / "b")
    assert snapshot(model) == before
    assert (weights.memory, weights.disk) == held
    assert torch.equal(model(IDS), expected)
    remove_hook_from_submodules(model)
    assert plain(model) and torch.equal(model(IDS), expected)


# --- an offload folder used by another model --------------------------------------------------------------


def test_a_model_in_ram_dispatched_into_another_models_offload_folder_keeps_its_own_weights(tmp_path):
    """The folder serves only what the model lacks: model B's weights, never model A's left in the folder."""
    folder = tmp_path / "offload"
    disk_offload(reference_tiny_lm(seed=0), folder, execution_device="cpu")  # model A fills the folder
    model_b = reference_tiny_lm(seed=1)
    expected = model_b(IDS)
    device_map = {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "cpu", "blocks.2": "disk", "blocks.3": "disk",
                  "norm": "disk", "head": "cpu"}
    dispatch_model(model_b, device_map, offload_dir=folder)
    assert torch.equal(model_b(IDS), expected)
    in_folder = set(json.loads((folder / "index.json").read_text())["weights"])
    assert {"blocks.2.fc1.weight", "norm.weight"} <= in_folder
    again = empty_lm()  # an empty model is served from the folder: now model B's weights for what B wrote
    rest = {k: v for k, v in reference_tiny_lm(seed=1).state_dict().items() if k not in in_folder}
    dispatch_model(again, {"": "cpu"}, state_dict=rest, offload_dir=folder)
    assert torch.equal(again(IDS), expected)


def test_an_offload_folder_on_a_read_only_file_system_is_a_named_error_and_the_model_is_unchanged(tmp_path):
    """For real: the folder bind-mounted read-only (every write fails with EROFS, even for root)."""
    from adversarial import read_only_view

    from hf_bigmodel import OffloadError

    (tmp_path / "src" / "offload").mkdir(parents=True)
    model = reference_tiny_lm()
    expected = model(IDS)
    before = snapshot(model)
    with read_only_view(tmp_path / "src", tmp_path / "ro") as ro:
        with pytest.raises(OffloadError, match="Read-only file system") as info:
            disk_offload(model, ro / "offload", execution_device="cpu")
        assert str(ro / "offload") in str(info.value) and "writable disk" in str(info.value)
        assert isinstance(info.value, OSError)
    assert snapshot(model) == before and torch.equal(model(IDS), expected)
