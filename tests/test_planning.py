"""Device-map planning and the device_map argument (planning, device_maps): exact maps for hand-built models,
budgets, ties, errors, tiny transformers models."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from hf_bigmodel.errors import DeviceMapError, InvalidMaxMemoryError
from hf_bigmodel.model.empty import init_empty_weights
from hf_bigmodel.model.naming import is_within, lookup
from hf_bigmodel.model.sizes import compute_module_sizes
from hf_bigmodel.plan.balance import get_balanced_memory, get_max_layer_size
from hf_bigmodel.plan.device_map import check_device_map, resolve_device_map
from hf_bigmodel.plan.memory import get_max_memory
from hf_bigmodel.plan.planner import infer_auto_device_map


class Leaf(nn.Module):
    """``numel`` float32 parameters (4 bytes each) and optionally a float32 buffer."""

    def __init__(self, numel: int, buffer: int = 0, persistent: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(numel))
        if buffer:
            self.register_buffer("stat", torch.zeros(buffer), persistent=persistent)


class Block(nn.Module):
    """The no-split class of these tests: 400 bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Leaf(50)
        self.b = Leaf(50)


class Stack(nn.Module):
    """A container holding a parameter of its own (100 bytes) next to three blocks (1200 bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(25))
        self.blocks = nn.ModuleList([Block() for _ in range(3)])


class Toy(nn.Module):
    """embed 400 B, stack 1300 B, norm 100 B + 100 B buffer, head tied to embed (0 B more): 1900 B."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = Leaf(100)
        self.stack = Stack()
        self.norm = Leaf(25, buffer=25)
        self.head = Leaf(100)
        self.head.weight = self.embed.weight


NO_SPLIT = ["Block"]


@pytest.fixture
def toy() -> Toy:
    with init_empty_weights():
        model = Toy()
    assert compute_module_sizes(model)[""] == 1900
    return model


def plan(model: nn.Module, max_memory: dict, **kwargs) -> dict:
    kwargs.setdefault("no_split_module_classes", NO_SPLIT)
    return infer_auto_device_map(model, max_memory, **kwargs)


def device_of(device_map: dict, name: str):
    return lookup(name, device_map)


# -- exact maps -------------------------------------------------------------------------------------


def test_everything_fits_exactly_means_one_entry_and_no_reservation(toy):
    # accelerate would keep room for the largest layer here and offload; nothing is offloaded, so no room is kept.
    assert plan(toy, {0: 1900, "cpu": 0}) == {"": 0}
    assert plan(toy, {"cpu": 1900}) == {"": "cpu"}


def test_unclean_result_lists_the_placed_items(toy):
    assert plan(toy, {0: 1900}, clean_result=False) == {"embed": 0, "stack": 0, "norm": 0, "head": 0}


def test_two_gpus_split_the_container_not_the_blocks(toy):
    device_map = plan(toy, {0: 1000, 1: 1000, "cpu": 10_000})
    assert device_map == {
        "embed": 0,
        "stack.scale": 0,
        "stack.blocks.0": 0,
        "stack.blocks.1": 1,
        "stack.blocks.2": 1,
        "norm": 1,
        "head": 0,  # registered last, but tied to embed
    }


def test_offloading_reserves_room_for_the_largest_layer_and_kept_buffers(toy):
    # Without a reservation GPU 0 would take embed+head, scale and blocks.0 (900 B). Offloaded: a block
    # (400 B, the largest layer) runs on GPU 0 and norm's buffer (100 B) stays there: 500 B kept free.
    device_map = plan(toy, {0: 1000, "cpu": 10_000})
    assert device_map == {"embed": 0, "stack.scale": 0, "stack.blocks": "cpu", "norm": "cpu", "head": 0}


def test_offload_buffers_shrinks_the_reservation(toy):
    # 1300 B on GPU 0: kept buffers make the reservation 500 B (blocks.0 cannot stay); offloading buffers
    # too makes it 400 B, and blocks.0 fits next to embed and scale.
    assert plan(toy, {0: 1300, "cpu": 10_000})["stack.blocks"] == "cpu"
    device_map = plan(toy, {0: 1300, "cpu": 10_000}, offload_buffers=True)
    assert device_map["stack.blocks.0"] == 0
    assert device_map["stack.blocks.1"] == "cpu"


def test_buffers_of_offloaded_modules_are_charged_to_the_execution_device(toy):
    # The CPU holds the blocks (1200 B) and norm's weight (100 B); norm's buffer stays on GPU 0.
    assert plan(toy, {0: 1000, "cpu": 1300})["norm"] == "cpu"
    assert plan(toy, {0: 1000, "cpu": 1300}, offload_buffers=True)["norm"] == "disk"


def test_cpu_only_reserves_on_cpu_for_disk_offload(toy):
    device_map = plan(toy, {"cpu": 1000})
    assert device_map == {"embed": "cpu", "stack.scale": "cpu", "stack.blocks": "disk", "norm": "disk", "head": "cpu"}


def test_dtype_changes_sizes(toy):
    assert plan(toy, {0: 950, "cpu": 10_000}, dtype=torch.float16) == {"": 0}
    assert plan(toy, {0: 950, "cpu": 10_000}, dtype="bf16") == {"": 0}
    assert plan(toy, {0: 950, "cpu": 10_000}) != {"": 0}
    # fp32 for the norm only: 1900/2 + 100/2 more
    special = {"norm.weight": torch.float32, "norm.stat": torch.float32}
    assert plan(toy, {0: 950, "cpu": 10_000}, dtype="fp16", special_dtypes=special) != {"": 0}
    assert plan(toy, {0: 1050, "cpu": 10_000}, dtype="fp16", special_dtypes=special) == {"": 0}


def test_tied_weights_follow_the_module_placed_first(toy):
    device_map = plan(toy, {0: 300, 1: 400, 2: 10_000})  # embed (400 B with head) does not fit on GPU 0
    assert device_map == {"embed": 1, "stack": 2, "norm": 2, "head": 1}


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = Leaf(200)
        self.head = Leaf(100)


class TiedInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = Leaf(100)
        self.decoder = Decoder()
        self.decoder.head.weight = self.embed.weight


def test_a_tied_partner_inside_a_big_module_is_split_out_of_it():
    with init_empty_weights():
        model = TiedInside()
    device_map = infer_auto_device_map(model, {0: 600, 1: 10_000})
    # embed + the whole decoder (1200 B) does not fit, so the decoder is split to bring only its head along.
    assert device_map == {"embed": 0, "decoder.body": 1, "decoder.head": 0}


def test_fallback_allocation_fills_a_device_that_would_stay_empty(toy):
    assert plan(toy, {0: 300, 1: 10_000}) == {"": 1}
    device_map = plan(toy, {0: 300, 1: 10_000}, fallback_allocation=True)
    assert device_map == {"embed": 1, "stack.scale": 0, "stack.blocks": 1, "norm": 1, "head": 1}


def test_root_parameters_get_their_own_key():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.zeros(250))  # 1000 B
            self.body = Leaf(250)

    with init_empty_weights():
        model = Scaled()
    assert infer_auto_device_map(model, {0: 1500, 1: 10_000}) == {"scale": 0, "body": 1}


def test_mps_is_the_execution_device_before_cpu(toy):
    device_map = plan(toy, {"mps": 1000, "cpu": 10_000})
    assert device_map == {"embed": "mps", "stack.scale": "mps", "stack.blocks": "cpu", "norm": "cpu", "head": "mps"}


def test_impossible_reservation_warns():
    with init_empty_weights():
        model = nn.Linear(10, 10)  # 440 B, a leaf: cannot be split
    with pytest.warns(UserWarning, match=r"run on 'cpu'.*440 B.*only 100 B"):
        assert infer_auto_device_map(model, {"cpu": 100}) == {"": "disk"}


def test_verbose_logs_decisions_and_never_prints(toy, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="hf_bigmodel.plan.planner"):
        plan(toy, {0: 1000, "cpu": 10_000}, verbose=True)
    text = caplog.text
    assert "Splitting stack" in text
    assert "re-planning with 500 B kept free on 0" in text
    assert capsys.readouterr().out == ""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_bigmodel.plan.planner"):
        plan(toy, {0: 1000, "cpu": 10_000})
    assert caplog.text == ""


def test_a_disk_budget_is_a_budget_and_disk_is_unlimited_without_one(toy):
    expected = {"embed": 0, "stack.scale": 0, "stack.blocks": "disk", "norm": "disk", "head": 0}
    assert plan(toy, {0: 1000}) == expected
    sizes, buffers = compute_module_sizes(toy), compute_module_sizes(toy, buffers_only=True)
    stored = {name: sizes[name] - buffers.get(name, 0) for name in sizes}  # buffers stay in RAM, not on disk
    on_disk = sum(stored[name] for name, device in expected.items() if device == "disk")
    assert plan(toy, {0: 1000, "disk": on_disk}) == expected  # exactly what it needs
    for budget in range(0, on_disk, 50):  # less: another plan within the budget, or an error saying so
        try:
            found = plan(toy, {0: 1000, "disk": budget})
        except DeviceMapError as err:
            assert "are left once every device is full" in str(err) and "'disk': " in str(err)
            continue
        assert sum(stored[name] for name, device in found.items() if device == "disk") <= budget, (budget, found)
    with pytest.raises(DeviceMapError, match="'disk': 0 B of 0 B"):
        plan(toy, {0: 1000, "disk": 0})


def test_resolve_passes_planning_options_through(toy):
    options = {"max_memory": {0: 1300, "cpu": 10_000}, "no_split_module_classes": NO_SPLIT, "check_devices": False}
    assert resolve_device_map(toy, "sequential", **options)["stack.blocks"] == "cpu"
    assert resolve_device_map(toy, "sequential", offload_buffers=True, **options)["stack.blocks.0"] == 0
    assert resolve_device_map(toy, "sequential", dtype="fp16", **options) == {"": 0}


def test_invalid_budget_names_the_entry(toy):
    with pytest.raises(InvalidMaxMemoryError, match="lots"):
        plan(toy, {0: "lots"})


# -- balanced -------------------------------------------------------------------------------------


def test_get_max_layer_size(toy):
    sizes = compute_module_sizes(toy)
    assert get_max_layer_size([("", toy)], sizes, NO_SPLIT) == (400, ["embed", "stack.blocks.0", "stack.blocks.1",
                                                                      "stack.blocks.2"])
    assert get_max_layer_size([("", toy)], sizes, [])[0] == 400  # embed, a leaf


def test_balanced_memory_lowers_all_but_the_last_gpu(toy):
    budgets = get_balanced_memory(toy, {0: 2000, 1: 2000, "cpu": 5000}, NO_SPLIT)
    assert budgets == {0: 950 + 400, 1: 2000, "cpu": 5000}
    device_map = resolve_device_map(toy, "balanced", max_memory={0: 2000, 1: 2000, "cpu": 5000},
                                    no_split_module_classes=NO_SPLIT, check_devices=False)
    assert device_map == {"embed": 0, "stack.scale": 0, "stack.blocks.0": 0, "stack.blocks.1": 0,
                          "stack.blocks.2": 1, "norm": 1, "head": 0}
    assert resolve_device_map(toy, "auto", max_memory={0: 2000, 1: 2000, "cpu": 5000},
                              no_split_module_classes=NO_SPLIT, check_devices=False) == device_map


def test_balanced_low_0_keeps_gpu_0_nearly_empty(toy):
    budgets = get_balanced_memory(toy, {0: 2000, 1: 2000, "cpu": 5000}, NO_SPLIT, low_zero=True)
    assert budgets == {0: 0, 1: 2000, "cpu": 5000}
    budgets = get_balanced_memory(toy, {0: 2000, 1: 1500, "cpu": 5000}, NO_SPLIT, low_zero=True)
    assert budgets[0] == 400  # what GPU 1 cannot hold
    device_map = resolve_device_map(toy, "balanced_low_0", max_memory={0: 2000, 1: 2000},
                                    no_split_module_classes=NO_SPLIT, check_devices=False)
    assert device_map == {"": 1}


def test_balanced_with_fewer_than_two_gpus_is_unchanged(toy):
    assert get_balanced_memory(toy, {0: 2000, "cpu": 5000}) == {0: 2000, "cpu": 5000}
    assert get_balanced_memory(toy, {0: 0, 1: "2KB", "cpu": 5000}) == {0: 0, 1: 2000, "cpu": 5000}
    assert get_balanced_memory(toy, {"cpu": "1MiB"}) == {"cpu": 2**20}


def test_sequential_fills_gpu_0_first(toy):
    device_map = resolve_device_map(toy, "sequential", max_memory={0: 2000, 1: 2000},
                                    no_split_module_classes=NO_SPLIT, check_devices=False)
    assert device_map == {"": 0}


# -- resolve_device_map --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device_map", "expected"),
    [(0, 0), ("cuda:1", 1), ("cpu", "cpu"), ("disk", "disk"), (torch.device("cuda", 2), 2), ("mps", "mps")],
)
def test_a_single_device_maps_the_whole_model(toy, device_map, expected):
    assert resolve_device_map(toy, device_map) == {"": expected}


def test_auto_without_budgets_measures_this_machine(toy):
    assert resolve_device_map(toy, "auto") == {"": next(iter(get_max_memory()))}


def test_a_dict_is_checked_and_normalised(toy):
    result = resolve_device_map(toy, {"": "cuda:0", "stack.blocks": torch.device("cpu"), "norm.stat": "disk"})
    assert result == {"": 0, "stack.blocks": "cpu", "norm.stat": "disk"}


def test_unknown_strategy_lists_the_choices(toy):
    with pytest.raises(DeviceMapError, match=r"'fastest'.*'auto', 'balanced', 'balanced_low_0', 'sequential'"):
        resolve_device_map(toy, "fastest")
    with pytest.raises(DeviceMapError, match="None"):
        resolve_device_map(toy, None)  # type: ignore[arg-type]
    with pytest.raises(DeviceMapError, match="-1"):
        resolve_device_map(toy, -1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a GPU budget on a machine without GPUs")
def test_resolve_checks_budget_devices_unless_told_not_to(toy):
    with pytest.raises(InvalidMaxMemoryError, match="no such device"):
        resolve_device_map(toy, "auto", max_memory={0: "1MiB", "cpu": "1MiB"})
    assert resolve_device_map(toy, "auto", max_memory={0: "1MiB", "cpu": "1MiB"}, check_devices=False) == {"": 0}


# -- check_device_map --------------------------------------------------------------------------------


def test_unknown_keys_are_named_with_suggestions(toy):
    with pytest.raises(DeviceMapError) as info:
        check_device_map(toy, {"": 0, "stack.blockz.0": 1, "nonsense": "cpu"})
    message = str(info.value)
    assert "2 key(s) name no module" in message
    assert "'stack.blockz.0' (did you mean 'stack.blocks.0'?)" in message
    assert "'nonsense'" in message
    assert info.value.modules == ["stack.blockz.0", "nonsense"]


def test_uncovered_tensors_are_named_with_the_fix(toy):
    with pytest.raises(DeviceMapError) as info:
        check_device_map(toy, {"embed": 0, "stack.blocks": 0, "norm.weight": "cpu"})
    message = str(info.value)
    assert "3 tensor(s) have no device: stack.scale, norm.stat, head.weight" in message
    assert "Add their module(s) (stack, norm, head)" in message
    assert "'' entry" in message


def test_non_persistent_buffers_need_no_key():
    with init_empty_weights():
        model = nn.Sequential(Leaf(4, buffer=4, persistent=False))
    assert check_device_map(model, {"0.weight": 0}) == {"0.weight": 0}


def test_bad_values_and_keys_are_all_reported_at_once(toy):
    with pytest.raises(DeviceMapError) as info:
        check_device_map(toy, {"": "gpu", "embed": -3, 7: 0, "stack.blockz": "cpu"})
    message = str(info.value)
    assert "device for '': 'gpu' is not a device" in message
    assert "device for 'embed': GPU index -3 is negative" in message
    assert "key 7 is a int" in message
    assert "'stack.blockz' (did you mean 'stack.blocks'?)" in message
    with pytest.raises(DeviceMapError, match="must be a dict"):
        check_device_map(toy, [("", 0)])  # type: ignore[arg-type]


def test_most_specific_key_wins_and_parameter_keys_are_valid(toy):
    device_map = {"": "cpu", "stack.blocks.1": 1, "stack.scale": 0}
    assert check_device_map(toy, device_map) == device_map


# -- tiny transformers models -----------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def build(config, cls=None) -> nn.Module:
    with init_empty_weights():
        return transformers.AutoModelForCausalLM.from_config(config) if cls is None else cls(config)


def assert_sound(model: nn.Module, device_map: dict, max_memory: dict) -> None:
    """No block split, ties together, every tensor covered, plain budgets held (reservation checked elsewhere)."""
    no_split = set(model._no_split_modules)
    check_device_map(model, device_map)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ in no_split]
    for key in device_map:
        assert not any(is_within(key, b) and key != b for b in blocks), f"{key} splits a block"
    for group in transformers_ties(model):
        assert len({device_of(device_map, name) for name in group}) == 1, group
    sizes = compute_module_sizes(model)
    used: dict = {}
    for name, _ in model.named_parameters():
        used[device_of(device_map, name)] = used.get(device_of(device_map, name), 0) + sizes[name]
    for device, size in used.items():
        if device != "disk":
            assert size <= max_memory[device]


def transformers_ties(model):
    from hf_bigmodel.model.sizes import find_tied_parameters

    return find_tied_parameters(model)


def test_tiny_llama_keeps_decoder_layers_whole():
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    model = build(config)
    sizes = compute_module_sizes(model)
    embed, layer, rotary = sizes["model.embed_tokens"], sizes["model.layers.0"], sizes["model.rotary_emb"]
    assert (embed, layer, rotary) == (65536, 147968, 64)
    # Unreserved, GPU 0 takes embed + 2 layers and only lm_head is offloaded; keeping lm_head's room pushes
    # layer 1 off GPU 0, which offloads layer 3 as well; keeping a layer + rotary buffers' room then holds.
    budgets = {0: embed + layer + (layer + rotary) + 500, 1: 2 * layer + 500, "cpu": 10**9}
    device_map = infer_auto_device_map(model, budgets, no_split_module_classes=model._no_split_modules)
    assert_sound(model, device_map, budgets)
    assert device_map == {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.layers.2": 1,
                          "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    assert embed + layer + (layer + rotary) <= budgets[0]
    assert all(p.device.type == "meta" for p in model.parameters())  # planning allocated nothing
    fp16 = infer_auto_device_map(model, budgets, no_split_module_classes=model._no_split_modules, dtype="fp16")
    assert fp16 == {"": 0}


def test_tiny_gpt2_keeps_lm_head_with_the_embedding():
    config = transformers.GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=100, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    model = build(config)
    sizes = compute_module_sizes(model)
    budgets = {0: sizes["transformer.wte"] + sizes["transformer.h.0"] + 1000, 1: 10**6}
    device_map = infer_auto_device_map(model, budgets, no_split_module_classes=model._no_split_modules)
    assert_sound(model, device_map, budgets)
    assert device_of(device_map, "lm_head.weight") == device_of(device_map, "transformer.wte.weight") == 0
    assert device_of(device_map, "transformer.h.1.attn.c_attn.weight") == 1


def test_tiny_t5_keeps_all_shared_embeddings_together():
    config = transformers.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=2, vocab_size=100,
                                   decoder_start_token_id=0)
    model = build(config, transformers.T5ForConditionalGeneration)
    sizes = compute_module_sizes(model)
    budgets = {0: sizes["shared"] + sizes["encoder.block.0"] + 100, 1: 10**6}
    device_map = infer_auto_device_map(model, budgets, no_split_module_classes=model._no_split_modules)
    assert_sound(model, device_map, budgets)
    ties = transformers_ties(model)
    assert ["decoder.embed_tokens.weight", "encoder.embed_tokens.weight", "lm_head.weight", "shared.weight"] in ties
    # The shared embedding pulls its three aliases out of the encoder, the decoder and the head.
    assert {k: v for k, v in device_map.items() if v == 0} == {
        "shared": 0, "encoder.embed_tokens": 0, "encoder.block.0": 0, "decoder.embed_tokens": 0, "lm_head": 0
    }
