"""``hf-bigmodel`` as a user types it: the installed command in a subprocess, with its output, exit status
and timing checked. (``test_cli.py`` covers the commands' results in depth, in-process.)

Every subprocess imports torch, which costs seconds on a loaded 2-core machine, so each test runs the
few commands that its behaviour needs and the models are built once per module.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from conftest import _closed_port_url
from hub_server import HubServer
from tiny_models import save_tiny_gpt2, save_tiny_llama

from hf_bigmodel.model.sizes import format_size

ROOT = Path(__file__).resolve().parents[1]
ERROR_LINE = re.compile(r"^hf-bigmodel: error: \S.*$")


def command() -> list[str]:
    """The installed ``hf-bigmodel`` next to this Python (``python -m hf_bigmodel`` where it is not installed)."""
    script = Path(sys.executable).parent / ("hf-bigmodel.exe" if os.name == "nt" else "hf-bigmodel")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "hf_bigmodel"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A hermetic environment: fresh HF_HOME, no token, the Hub at a closed local port, progress bars off."""
    home = tmp_path_factory.mktemp("cli_home")
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_"))}
    return {**keep, "HF_HOME": str(home), "HF_ENDPOINT": _closed_port_url(), "HF_HUB_DISABLE_TELEMETRY": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_models")
    llama = save_tiny_llama(root / "llama", sharded=True).path
    config_only = root / "config_only"
    config_only.mkdir()
    config = json.loads((llama / "config.json").read_text())
    (config_only / "config.json").write_text(json.dumps(config))
    torch_gpt2 = save_tiny_gpt2(root / "gpt2_bin", safe_serialization=False).path
    return {"llama": llama, "config_only": config_only, "gpt2_bin": torch_gpt2}


def hf_bigmodel(env: dict[str, str], *argv: object, extra_env: dict[str, str] | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*command(), *map(str, argv)], capture_output=True, text=True, check=False,
                          env={**env, **(extra_env or {})}, timeout=timeout)


def assert_one_error_line(result: subprocess.CompletedProcess[str], status: int, *needles: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, result.stderr
    assert len(lines) == 1 and ERROR_LINE.match(lines[0]), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


# -- help -------------------------------------------------------------------------------------------
def test_help_imports_neither_torch_nor_transformers(env: dict[str, str]) -> None:
    """``--help`` answers without the heavy imports (what made it take seconds) and documents the units,
    the exit statuses and examples."""
    for argv in (["--help"], ["plan", "--help"], ["run", "--help"]):
        result = hf_bigmodel(env, *argv, extra_env={"PYTHONPROFILEIMPORTTIME": "1"})
        assert result.returncode == 0, result.stderr
        imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "hf_bigmodel" in imported and "argparse" in imported  # the profile is really there
        assert not imported & {"torch", "transformers", "huggingface_hub", "safetensors", "numpy"}, argv
        assert "examples:" in result.stdout and "hf-bigmodel " + (argv[0] if argv[0] != "--help" else "plan") \
            in result.stdout
        assert "lower-case b means bits" in result.stdout
    assert "exit status:" in hf_bigmodel(env, "--help").stdout


# -- errors speak the command line -------------------------------------------------------------------
def test_usage_errors_name_the_help_once(env: dict[str, str], models: dict[str, Path]) -> None:
    result = hf_bigmodel(env, "run", models["llama"], "--max-new-tokens", "0", "--prompt", "hi")
    line = assert_one_error_line(result, 2, "must be at least 1")
    assert line.count("--help") == 1 and line.endswith("(see 'hf-bigmodel run --help')")
    result = hf_bigmodel(env, "plan")
    line = assert_one_error_line(result, 2, "MODEL")
    assert line.count("--help") == 1


def test_library_advice_is_spelled_as_options(env: dict[str, str], models: dict[str, Path],
                                              tmp_path: Path) -> None:
    """A torch checkpoint that must go partly to disk asks for --offload-folder, not offload_folder=; a
    folder without weights names the files looked for, not weight_names=[...]."""
    result = hf_bigmodel(env, "run", models["gpt2_bin"], "--prompt", "hello", "--max-new-tokens", "2",
                         "--max-memory", "cpu=15KB")
    line = assert_one_error_line(result, 2, "torch checkpoint", "Pass --offload-folder ")
    assert "offload_folder" not in line
    result = hf_bigmodel(env, "run", models["config_only"], "--prompt", "hi", "--tokenizer", models["llama"])
    line = assert_one_error_line(result, 2, "holds no PyTorch weights", "model.safetensors")
    assert "weight_names" not in line and "=[" not in line


def test_plan_prints_budgets_in_bytes_and_flags_bits(env: dict[str, str], models: dict[str, Path]) -> None:
    """cpu=64kb is 8,000 bytes (bits, as in accelerate): the plan says so, and the planner's warning that a
    layer will not fit names the option, not the Python argument."""
    result = hf_bigmodel(env, "plan", models["llama"], "--max-memory", "cpu=64kb")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("Budgets"))
    assert "cpu=8,000 bytes from '64kb'" in line and "bits" in line
    warning, = result.stderr.strip().splitlines()
    assert warning.startswith("hf-bigmodel: warning: Offloaded weights run on 'cpu'") and "only 7.81 KiB" in warning
    assert "Raise its budget (--max-memory DEVICE=SIZE)" in warning
    assert "max_memory[" not in warning and "offload_buffers" not in warning


# -- the Hub: options, offline, unreachable ------------------------------------------------------------
def test_hub_options_token_revision_and_local_files_only(env: dict[str, str], models: dict[str, Path],
                                                         tmp_path: Path) -> None:
    """--token reaches a gated repo, --revision picks the branch (advice names both options), and once
    cached a repo plans with --local-files-only while the Hub is gone."""
    home = {"HF_HOME": str(tmp_path / "home")}
    with HubServer() as server:
        server.add_repo("org/gated", models["llama"], gated=True)
        online = {**home, "HF_ENDPOINT": server.url}
        result = hf_bigmodel(env, "plan", "org/gated", "--max-memory", "cpu=1GiB", extra_env=online)
        line = assert_one_error_line(result, 2, "is gated", "Then pass --token hf_...")
        assert "token=" not in line
        result = hf_bigmodel(env, "plan", "org/gated", "--revision", "nope", "--token", server.token,
                             "--max-memory", "cpu=1GiB", extra_env=online)
        line = assert_one_error_line(result, 2, "Revision 'nope'", "e.g. --revision main")
        result = hf_bigmodel(env, "plan", "org/gated", "--revision", "main", "--token", server.token,
                             "--max-memory", "cpu=1GiB", "--json", extra_env=online)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["model_class"] == "LlamaForCausalLM"
        fetched = [r for r in server.requests if r.filename == "config.json" and r.status == 200]
        assert fetched and all(r.authorization == f"Bearer {server.token}" for r in fetched)
    # The server is gone: the cached config is enough with --local-files-only, an uncached repo is not.
    result = hf_bigmodel(env, "plan", "org/gated", "--local-files-only", "--max-memory", "cpu=1GiB", "--json",
                         extra_env=home)
    assert result.returncode == 0, result.stderr
    result = hf_bigmodel(env, "plan", "org/never-cached", "--local-files-only", extra_env=home)
    line = assert_one_error_line(result, 2, "'config.json' is not in the cache",
                                 "--local-files-only forbids asking the Hub")
    assert "local_files_only" not in line


def test_an_unreachable_hub_fails_fast(env: dict[str, str], models: dict[str, Path]) -> None:
    """huggingface_hub retries an unreachable Hub for ~25 s (1+2+4+8+8 s of sleep) before giving up; the
    command asks once and says what failed. Timed against a local failure that pays the same imports."""
    start = time.perf_counter()
    local = hf_bigmodel(env, "plan", models["llama"] / "missing")
    baseline = time.perf_counter() - start
    assert_one_error_line(local, 2, "was not found")
    start = time.perf_counter()
    result = hf_bigmodel(env, "plan", "org/tiny-llama")  # env's HF_ENDPOINT: a closed local port
    elapsed = time.perf_counter() - start
    assert_one_error_line(result, 1, "Could not reach http://127.0.0.1:", "'config.json'", "not in the cache")
    assert elapsed - baseline < 10, (elapsed, baseline)


def test_trust_remote_code(env: dict[str, str], tmp_path: Path) -> None:
    folder = save_tiny_gpt2(tmp_path / "remote", with_tokenizer=False).path
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FancyForCausalLM"]
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_fancy.FancyForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_fancy.py").write_text(
        "from transformers import GPT2LMHeadModel\n\n\nclass FancyForCausalLM(GPT2LMHeadModel):\n    pass\n"
    )
    result = hf_bigmodel(env, "plan", folder, "--max-memory", "cpu=1GiB")
    line = assert_one_error_line(result, 2, "code shipped in the repo", "Pass --trust-remote-code if you trust")
    assert "trust_remote_code=" not in line
    result = hf_bigmodel(env, "plan", folder, "--max-memory", "cpu=1GiB", "--trust-remote-code", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model_class"] == "FancyForCausalLM"


# -- plan: config only, collapsed runs, the prefetch window -------------------------------------------------
def test_config_only_plan_assumes_float32_and_collapses_runs(env: dict[str, str], models: dict[str, Path],
                                                             tmp_path: Path) -> None:
    """A folder with only config.json (no dtype in it) plans as from_pretrained would load: float32, said
    so once. The table collapses runs of layers on one device; --json keeps every entry; both show the
    prefetch window."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_bigmodel import compute_module_sizes, init_empty_weights, resolve_device_map
    from hf_bigmodel.runtime.prefetch import plan_prefetch
    from hf_bigmodel.runtime.prefetch_plan import prefetch_headroom

    folder = tmp_path / "config_only"
    folder.mkdir()
    config = json.loads((models["llama"] / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    # 64 MiB decoder layers (float32), each a prefetch group of its own, so the GPU keeps room for the groups
    # in use and read ahead beside its layers (tiny layers would be one group the GPU cannot hold twice).
    config.update(num_hidden_layers=8, hidden_size=1024, intermediate_size=4096, num_attention_heads=8,
                  num_key_value_heads=8, head_dim=128)
    (folder / "config.json").write_text(json.dumps(config))
    budgets = ["--max-memory", "0=400MiB,cpu=150MiB"]
    result = hf_bigmodel(env, "plan", folder, *budgets, "--json")
    assert result.returncode == 0, result.stderr
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 1 and "assuming float32" in warnings[0] and "--dtype" in warnings[0]
    report = json.loads(result.stdout)
    assert report["dtype"] == "float32" and report["dtype_assumed"] is True
    # The plan of the model built in float32 from the same config, as from_pretrained would build it.
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    sizes = compute_module_sizes(model, torch.float32)
    expected = resolve_device_map(model, "auto", max_memory={0: 400 * 2**20, "cpu": 150 * 2**20},
                                  no_split_module_classes=["LlamaDecoderLayer"], dtype=torch.float32,
                                  check_devices=False, main_headroom=prefetch_headroom())
    assert report["device_map"] == expected
    assert report["total_size"] == sizes[""]
    layers = {k: v for k, v in report["device_map"].items() if k.startswith("model.layers.")}
    assert len(layers) == 8  # --json keeps one entry per layer
    planned = plan_prefetch(model, expected, sizes=sizes)
    assert report["prefetch"] == {"device": 0, "window": planned.window_text, "total": planned.total,
                                  "groups": planned.groups, "largest_group": list(planned.largest),
                                  "largest_group_size": planned.largest_bytes}

    text = hf_bigmodel(env, "plan", folder, *budgets)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert "in float32 (assumed" in lines[0]
    rows = [line.split() for line in lines if line.startswith("model.layers.")]
    covered = []
    for row in rows:  # e.g. ['model.layers.0-2', '27.38', 'KiB', '(3', 'x', '9.12', 'KiB)', '0']
        first, _, last = row[0].removeprefix("model.layers.").partition("-")
        span = range(int(first), int(last or first) + 1)
        devices = [layers[f"model.layers.{i}"] for i in span]
        if row[-1] == "(spread)":  # e.g. [..., 'cpu', 'x2,', 'disk', 'x3', '(spread)']: RAM and disk alternating
            assert row[-5:-1] == ["cpu", f"x{devices.count('cpu')},", "disk", f"x{devices.count('disk')}"], row
            assert set(devices) == {"cpu", "disk"}
        else:
            assert set(devices) == {int(row[-1]) if row[-1].isdigit() else row[-1]}
        covered += span
    assert covered == list(range(8)) and len(rows) < 8  # every layer once, in fewer rows
    prefetch_line = next(line for line in lines if line.startswith("Prefetching:"))
    assert f"up to {format_size(planned.total)} on 0 while the model runs" in prefetch_line
    assert f"{format_size(planned.largest_bytes)}) and {planned.window_text} read ahead" in prefetch_line
    peak_line = next(line for line in lines if line.startswith("Peak memory on 0"))
    placed = report["totals"]["0"]  # the weights mapped to 0 and the buffers that stay on it
    assert placed >= sum(sizes[name] for name, device in expected.items() if device == 0)
    assert (f"{format_size(placed)} of weights placed there + {format_size(planned.total)} prefetching = "
            f"{format_size(placed + planned.total)}") in peak_line
    assert placed + planned.total <= 400 * 2**20  # the GPU's budget holds its layers and the prefetch buffers


# -- run: streaming, progress, batches, sampling, chat ----------------------------------------------------
def _run_with_terminal_stderr(env: dict[str, str], *argv: object) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal (progress bars show, as for a user) and stdout on a pipe."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 0 columns would hide the bar
    proc = subprocess.Popen([*command(), *map(str, argv)], stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    out = proc.stdout.read().decode() if proc.stdout else ""
    return proc.wait(timeout=300), out, b"".join(chunks).decode(errors="replace")


def _reference_generate(folder: Path, prompts: list[str], **kwargs: object) -> list:
    """transformers' own model and tokenizer: token ids of each prompt, its padded row and the generated row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    inputs = tokenizer(prompts, return_tensors="pt", padding=len(prompts) > 1)
    seed = kwargs.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        output = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, **kwargs)
    length = inputs["input_ids"].shape[1]
    texts = []
    for i, prompt in enumerate(prompts):
        full = tokenizer.decode(output[i], skip_special_tokens=True)
        echoed = tokenizer.decode(inputs["input_ids"][i], skip_special_tokens=True)
        texts.append(prompt + full[len(echoed):])
    return [texts, output[:, length:]]


def test_run_streams_one_prompt_with_a_byte_progress_bar(env: dict[str, str], tmp_path: Path) -> None:
    """A single-file checkpoint shows a loading bar in bytes on a terminal; the continuation equals
    transformers' greedy one; the speed line closes stderr."""
    folder = save_tiny_llama(tmp_path / "single").path
    assert [p.name for p in folder.glob("*.safetensors")] == ["model.safetensors"]
    code, out, err = _run_with_terminal_stderr(env, "run", folder, "--prompt", "hello big world",
                                               "--max-new-tokens", "7")
    assert code == 0, err
    (expected,), _ = _reference_generate(folder, ["hello big world"], max_new_tokens=7, do_sample=False)
    assert out == expected + "\n"
    from safetensors.torch import load_file

    total = sum(t.numel() * t.element_size() for t in load_file(folder / "model.safetensors").values())
    assert "Loading weights:" in err and f"/{total / 1024:.1f}k " in err, err  # counted in bytes, not shards
    assert re.search(r"generated 7 tokens in [\d.]+ s \([\d.]+ tokens/s; first after [\d.]+ s\)\.", err), err


def test_run_batches_sampled_prompts(env: dict[str, str], models: dict[str, Path]) -> None:
    """Several prompts run as one left-padded batch; sampling with a seed gives what transformers gives
    with that seed; each completion is printed under its own header."""
    prompts = ["hello big world", "the cat is on the"]
    result = hf_bigmodel(env, "run", models["llama"], *[a for p in prompts for a in ("--prompt", p)],
                         "--max-new-tokens", "5", "--do-sample", "--temperature", "0.8", "--top-p", "0.9",
                         "--seed", "3", "--max-memory", "cpu=20KB")
    assert result.returncode == 0, result.stderr
    expected, new = _reference_generate(models["llama"], prompts, max_new_tokens=5, do_sample=True,
                                        temperature=0.8, top_p=0.9, seed=3)
    assert result.stdout == f"==> prompt 1/2 <==\n{expected[0]}\n\n==> prompt 2/2 <==\n{expected[1]}\n"
    rows = [row.tolist() for row in new]  # a row that ended (eos, id 2) is padded: those are not generated
    generated = sum(row.index(2) + 1 if 2 in row else len(row) for row in rows)
    assert f"generated {generated} tokens" in result.stderr.strip().splitlines()[-1]


def test_run_chat_uses_the_template(env: dict[str, str], models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "chat"
    folder.mkdir()
    for file in models["llama"].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = ("{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
                               "{% if add_generation_prompt %}<s>{% endif %}")
    tokenizer.save_pretrained(folder)
    result = hf_bigmodel(env, "run", folder, "--chat", "--prompt", "hello world", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "hello world"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    prompt = inputs["input_ids"][0].tolist()
    full = tokenizer.decode(output[0], skip_special_tokens=True)
    assert result.stdout == full[len(tokenizer.decode(prompt, skip_special_tokens=True)):] + "\n"
    # Without a template, --chat is a mistake on the command line.
    result = hf_bigmodel(env, "run", models["llama"], "--chat", "--prompt", "hi")
    assert_one_error_line(result, 2, "argument --chat", "has no chat template")


def test_sampling_options_need_do_sample(env: dict[str, str], models: dict[str, Path]) -> None:
    result = hf_bigmodel(env, "run", models["llama"], "--prompt", "hi", "--top-p", "0.5",
                         extra_env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 2 and "import time:" in result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert len(errors) == 1 and "argument --top-p: only applies with --do-sample" in errors[0]
    assert "torch" not in {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                           if line.startswith("import time:")}  # checked before anything heavy is imported
    result = hf_bigmodel(env, "run", models["llama"], "--prompt", "hi", "--do-sample", "--top-p", "1.5")
    assert_one_error_line(result, 2, "argument --top-p: '1.5' must be greater than 0 and at most 1")


# -- run --assistant: assisted generation -----------------------------------------------------------------
FORWARDS = re.compile(r"generated (\d+) tokens in .*; (\d+) forward passes of the model, checking the assistant's")


@pytest.mark.slow
def test_run_with_an_assistant_gives_the_models_own_greedy_tokens(env: dict[str, str], models: dict[str, Path]
                                                                  ) -> None:
    """A draft model in RAM proposes tokens that the offloaded model checks: with the model itself as its
    draft every proposal is right, so fewer forward passes than tokens, and the text is the model's own
    greedy continuation. (A draft that disagrees: test_cli.py, in-process.)"""
    prompt, new = "hello big world", 12
    (expected,), _ = _reference_generate(models["llama"], [prompt], max_new_tokens=new, do_sample=False)
    result = hf_bigmodel(env, "run", models["llama"], "--prompt", prompt, "--max-new-tokens", new,
                         "--max-memory", "cpu=20KB", "--assistant", models["llama"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # the speed line, no stray warnings
    tokens, forwards = map(int, FORWARDS.search(result.stderr).groups())  # type: ignore[union-attr]
    assert tokens == new and forwards < tokens, result.stderr


def test_assistant_mistakes_exit_2(env: dict[str, str], models: dict[str, Path], tmp_path: Path) -> None:
    result = hf_bigmodel(env, "run", models["llama"], "--prompt", "a", "--prompt", "b", "--assistant", models["llama"])
    assert_one_error_line(result, 2, "argument --assistant: assisted generation continues one prompt at a time",
                          "(see 'hf-bigmodel run --help')")
    result = hf_bigmodel(env, "run", models["llama"], "--prompt", "a", "--assistant", tmp_path / "missing")
    assert_one_error_line(result, 2, "argument --assistant: Model", "missing' was not found")
