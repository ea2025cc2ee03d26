"""The command line of pipelines: ``plan --stages N`` (nothing loaded) and ``run`` under torchrun (text once)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hf_bigmodel.cli import main

transformers = pytest.importorskip("transformers")

from pipeline_launch import base_env
from tiny_models import save_tiny_llama


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("pipeline_cli") / "llama", sharded=True, layers=4).path


def _main(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_stages_shows_the_cut_and_where_each_process_keeps_its_stage(capsys, llama):
    from hf_bigmodel.parallel.stages import plan_stages

    code, out, err = _main(capsys, "plan", llama, "--stages", 2, "--max-memory", "cpu=20KB", "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert [s["blocks"] for s in shown["stages"]] == [[0, 2], [2, 4]]
    assert shown["stages"][0]["units"] == ["model.embed_tokens", "model.layers.0", "model.layers.1"]
    assert shown["stages"][1]["units"] == ["model.layers.2", "model.layers.3", "model.norm", "lm_head"]
    assert shown["shared"] == ["model.rotary_emb"]
    assert "disk" in shown["stages"][1]["device_map"].values()  # 20 KB cannot hold a stage of ~26 KiB
    model = transformers.AutoModelForCausalLM.from_pretrained(llama)
    assert [s["bytes"] for s in shown["stages"]] == [plan_stages(model, 2).bytes_of(s) for s in range(2)]

    code, out, err = _main(capsys, "plan", llama, "--stages", 2, "--max-memory", "cpu=1GiB")
    assert code == 0, err
    assert out.splitlines()[1].startswith("  stage 0: model.embed_tokens, model.layers.0-1  ")
    assert out.splitlines()[2].endswith("all in memory")


def test_more_stages_than_blocks_is_a_usage_error(capsys, llama):
    code, out, err = _main(capsys, "plan", llama, "--stages", 5)
    assert code == 2 and out == ""
    assert err.strip() == ("hf-bigmodel: error: --stages 5: LlamaForCausalLM has 4 block(s) in 'model.layers', too "
                           "few for 5 pipeline stages (each stage runs at least one block). Start at most 4 processes.")


def test_run_under_torchrun_prints_the_text_of_one_process_once(capsys, llama, tmp_path):
    """``torchrun --nproc-per-node 2 -m hf_bigmodel run``: a 2-stage pipeline whose text is one process's."""
    argv = ["run", str(llama), "--prompt", "hello big world", "--max-new-tokens", "8", "--max-memory", "cpu=1GiB"]
    code, alone, err = _main(capsys, *argv)
    assert code == 0, err
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "hf_bigmodel",
         *argv], env=base_env(tmp_path / "hf_home"), capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-4000:]
    assert launched.stdout == alone  # the same tokens, printed once (by rank 0)
    generated = re.search(r"generated \d+ tokens", err)
    assert generated is not None, err
    for stage in (0, 1):  # each process reports its own stage
        line, = [x for x in launched.stderr.splitlines() if x.startswith(f"stage {stage} of 2: Loaded ")]
        assert generated.group(0) in line, line


@pytest.mark.parametrize("option", [["--do-sample"], ["--assistant", "{llama}"]])
def test_run_under_torchrun_refuses_what_a_pipeline_cannot_do_before_loading(capsys, llama, monkeypatch, option):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the refusal comes before any process group
    code, out, err = _main(capsys, "run", llama, "--prompt", "hi", *[o.format(llama=llama) for o in option])
    assert code == 2 and out == ""
    assert f"argument {option[0]}: under torchrun (WORLD_SIZE > 1) run loads a pipeline" in err, err
