"""The benchmark's arithmetic (benchmarks/report.py, system.py): the README's ratios, bounds and floors.

The benchmark itself is not part of the test suite (it takes minutes); what turns its runs into claims is.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import report
    import system

    return report, system


def run(status="OK", **figures):
    return {"status": status, "phase": "done" if status == "OK" else "forward", **figures}


def test_summaries_take_medians_of_ok_runs_and_count_failures(bench):
    report, _ = bench
    ok = report.summarize_runs([
        run(load_s=1.0, generate_s=4.0, peak_rss=900, logits_max_diff=0.0, tokens_match=True,
            bytes_per_device={"cpu": 10, "disk": 1300}),
        run(load_s=3.0, generate_s=5.0, peak_rss=1000, logits_max_diff=0.5, tokens_match=True),
        run(load_s=2.0, generate_s=6.0, peak_rss=800, logits_max_diff=0.0, tokens_match=False),
    ])
    assert (ok["load_s"], ok["generate_s"], ok["peak_rss"]) == (2.0, 5.0, 900)
    assert ok["logits_max_diff"] == 0.5 and ok["tokens_match"] is False  # the worst run speaks
    assert ok["status"] == "OK" and ok["disk_bytes"] == 1300
    killed = report.summarize_runs([run("KILLED", load_s=5.0), run("OK", load_s=7.0), run("KILLED", load_s=6.0)])
    assert killed["load_s"] == 7.0  # figures of OK runs only when there are some
    assert killed["status"].startswith("KILLED 2/3, OK 1/3 (during forward")


def test_ratios_are_to_the_best_anchor_in_each_column(bench):
    report, _ = bench
    summaries = {
        "transformers": {"load_s": 2.0, "generate_s": 12.0, "peak_rss": 800, "status": "OK"},
        "accelerate": {"load_s": 4.0, "generate_s": None, "peak_rss": None, "status": "KILLED 1/1"},  # no figure
        "hf_bigmodel": {"load_s": 1.0, "generate_s": 4.0, "peak_rss": 1200, "status": "OK"},
    }
    assert report.best_anchor(summaries, "load_s") == ("transformers", 2.0)
    assert report.ratios(summaries, "hf_bigmodel") == {"load_s": 0.5, "generate_s": 4.0 / 12.0, "peak_rss": 1.5}
    text = report.table(summaries, markdown=True)
    assert "| hf_bigmodel | 1.00 (0.50x) | 4.00 (0.33x) |" in text


def test_memory_formula_uses_the_prefetchers_own_bound(bench):
    report, _ = bench
    mib = 2**20
    baseline = {"baseline_rss": 376 * mib, "decoder_layer_bytes": 86 * mib}
    stats = {"memory_bound": 297 * mib, "largest_group": 125 * mib, "window_bytes": 172 * mib, "depth": 18}
    summary = {"peak_rss": 1260 * mib, "prefetch": stats}
    check = report.memory_formula(summary, cpu_budget=600 * mib, baseline=baseline)
    assert check["bound"] == (600 + 297 + 376) * mib and check["holds"]
    assert "125.00 MiB largest group + 172.00 MiB window" in check["text"] and check["text"].endswith("HOLDS")
    loaded = report.summarize_runs([run(peak_rss=700 * mib, rss_after_load=(376 + 15) * mib, prefetch=stats,
                                        activation_bytes=8 * mib, bytes_per_device={"disk": 10})])
    check = report.memory_formula(loaded, cpu_budget=0, baseline=baseline)  # budget 0: everything on disk
    assert check["bound"] == (376 + 15 + 297 + 8) * mib and not check["holds"]
    assert "15.00 MiB dispatch + 0 B budget" in check["text"] and "8.00 MiB activations" in check["text"]
    over = report.memory_formula({**summary, "peak_rss": 1400 * mib}, cpu_budget=600 * mib, baseline=baseline)
    assert not over["holds"] and over["text"].endswith("EXCEEDED")
    groups = report.memory_formula({**summary, "prefetch": {**stats, "window_bytes": None, "depth": 2,
                                                            "memory_bound": 375 * mib}},
                                   cpu_budget=600 * mib, baseline=baseline)
    assert "(2+1) x 125.00 MiB" in groups["text"] and groups["bound"] == (600 + 375 + 376) * mib
    assert report.memory_formula({"peak_rss": 1}, cpu_budget=1, baseline=baseline) is None  # not hf_bigmodel


def test_floor_takes_the_larger_of_compute_and_reading_in_each_forward(bench):
    report, _ = bench
    # 4 forwards reading 3 GB in all (0.75 GB each = 0.25 s at 3 GB/s); the prefill computes for 1 s.
    summary = {"generate_s": 2.2, "generate_read_bytes": 3e9, "forwards": 4}
    compute = [1.0, 0.1, 0.1, 0.1]
    floor = report.floor(summary, compute=compute, bandwidth=3e9)
    assert floor["floor_s"] == pytest.approx(1.0 + 3 * 0.25)
    assert floor["ratio"] == pytest.approx(2.2 / 1.75)
    assert floor["serial_s"] == pytest.approx(1.3 + 1.0)
    assert "disk-bound in 3 of 4 forwards" in floor["text"]
    assert report.floor(summary, compute=compute, bandwidth=None) is None
    assert report.floor(summary, compute=compute[:3], bandwidth=3e9) is None  # another number of forwards
    assert report.floor({**summary, "generate_read_bytes": None}, compute=compute, bandwidth=3e9) is None
    nothing_read = report.floor({**summary, "generate_read_bytes": 0}, compute=compute, bandwidth=3e9)
    assert nothing_read["floor_s"] == pytest.approx(1.3)  # all in RAM: the floor is the compute


def test_floor_around_each_run_uses_the_faster_of_the_passes_before_and_after_it(bench):
    report, _ = bench
    compute = [1.0, 0.1, 0.1, 0.1]  # 0.75 GB read per forward
    runs = [run(generate_s=2.2, generate_read_bytes=3e9, generate_forward_s=[1, 0.4, 0.4, 0.4],
                disk_bandwidth_around=[1.5e9, 3e9]),  # floor 1.75 s at 3 GB/s (the faster pass)
            run(generate_s=4.0, generate_read_bytes=3e9, generate_forward_s=[1, 1, 1, 1],
                disk_bandwidth_around=[1.5e9, None]),  # floor 1 + 3 x 0.5 = 2.5 s
            run(generate_s=9.0, generate_read_bytes=3e9, generate_forward_s=[1, 1, 1, 1]),  # not measured
            run("KILLED", generate_s=1.0, generate_read_bytes=3e9, generate_forward_s=[1, 1, 1, 1],
                disk_bandwidth_around=[3e9, 3e9])]
    around = report.floor_around(runs, compute=compute)
    assert around["ratios"] == pytest.approx([2.2 / 1.75, 4.0 / 2.5])
    assert around["bandwidths"] == [3e9, 1.5e9]
    assert around["ratio"] == pytest.approx((2.2 / 1.75 + 4.0 / 2.5) / 2)
    assert "1.50-3.00 GB/s" in around["text"]
    assert report.floor_around(runs, compute=compute[:3]) is None  # another number of forwards
    assert report.floor_around(runs[2:], compute=compute) is None


def test_compute_times_are_medians_per_forward(bench):
    report, _ = bench
    runs = [run(generate_forward_s=[1.0, 0.2, 0.1]), run(generate_forward_s=[3.0, 0.1, 0.3]),
            run(generate_forward_s=[2.0, 0.3, 0.2]), run("FAILED", generate_forward_s=[9.0, 9.0, 9.0])]
    assert report.compute_times(runs) == [2.0, 0.2, 0.2]
    assert report.compute_times([run(generate_forward_s=[1.0]), run(generate_forward_s=[1.0, 2.0])]) is None
    assert report.compute_times([]) is None
    summary = report.summarize_runs([run(generate_s=1.0, generate_read_bytes=10, generate_forward_s=[0.5, 0.5])])
    assert summary["generate_read_bytes"] == 10 and summary["forwards"] == 2


def test_direct_read_bandwidth_reads_every_byte(bench, tmp_path, monkeypatch):
    _, system = bench
    data = tmp_path / "shard.bin"
    data.write_bytes(os.urandom(3 * 2**20 + 123))
    reads = []
    original = os.preadv

    def counting(fd, buffers, offset):
        n = original(fd, buffers, offset)
        reads.append(n)
        return n

    monkeypatch.setattr(system.os, "preadv", counting)
    bandwidth = system.direct_read_bandwidth([tmp_path], chunk=2**20, repeat=2)
    if bandwidth is None:  # this filesystem refuses O_DIRECT
        pytest.skip(f"{tmp_path} does not support O_DIRECT")
    assert bandwidth > 0
    assert sum(reads) == 2 * data.stat().st_size  # two passes, each over the whole file


def test_forward_timer_counts_each_call_and_the_bytes_read_from_storage(bench, tmp_path, monkeypatch):
    import torch

    _, system = bench
    import runner

    data = tmp_path / "weights.bin"
    data.write_bytes(os.urandom(2**20))
    system.evict_from_page_cache([data])

    class Reads(torch.nn.Module):
        def forward(self, x):
            fd = os.open(data, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.pread(fd, 2**20, 0)
            finally:
                os.close(fd)
            return x

    model = Reads()
    timer = runner.ForwardTimer(model)
    timer.start()
    for _ in range(3):
        model(torch.zeros(1))
    timer.stop()
    model(torch.zeros(1))  # after stop(): not counted
    assert len(timer.seconds) == len(timer.read_bytes) == 3
    if system.proc_io()["read_bytes"] == 0:
        pytest.skip("this kernel does not account storage reads in /proc/self/io")
    assert all(n >= 2**20 for n in timer.read_bytes)  # each forward fetched the file from storage
    assert timer.total_read_bytes >= 3 * 2**20


def test_the_disk_is_named(bench, tmp_path):
    _, system = bench
    text = system.disk_description(tmp_path)
    assert text == "unknown disk" or "GiB" in text


def test_scale_checkpoints_are_llama_checkpoints_transformers_loads(bench, tmp_path, monkeypatch):
    import scale
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    tiny = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 128}
    monkeypatch.setitem(scale.SHAPES, "tiny", tiny)
    monkeypatch.setattr(scale, "SHARD_BYTES", 40_000)  # several shards
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LlamaForCausalLM(LlamaConfig(**tiny)).state_dict().items()}
    assert dict(scale.tensor_specs(tiny)) == expected
    path = scale.build(tmp_path, "tiny")
    assert len(list(path.glob("*.safetensors"))) > 1
    assert sum(f.stat().st_size for f in path.glob("*.safetensors")) >= scale.checkpoint_bytes(tiny)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
    assert model.lm_head.weight.shape == (128, 64) and model.lm_head.weight.dtype == torch.bfloat16
    assert scale.build(tmp_path, "tiny") == path  # built once


def test_scale_rows_report_decode_time_against_the_floor(bench):
    report, _ = bench
    entry = {"bytes": 2**30, "bandwidth": 1e9, "runs": {
        "hf_bigmodel": run(generate_forward_s=[5.0, 1.0, 1.2, 1.1], generate_read_bytes=4 * 10**9, peak_rss=2**30),
        "accelerate": {"status": "SKIPPED", "error": "disk"},
        "transformers": run(generate_forward_s=[5.0, 0.2, 0.2], generate_read_bytes=3 * 90 * 2**10, peak_rss=2**30)}}
    rows = report.scale_rows("8b", entry, new_tokens=4)
    assert rows[0].startswith("| 8b (1.00 GiB) | hf_bigmodel | 1.10 | 1.00 | 1.10x |")
    assert "SKIPPED (disk)" in rows[1]
    assert rows[2].startswith("| 8b (1.00 GiB) | transformers | 0.20 | - | - | 90.00 KiB |")  # the page cache served it


def test_throughput_table_compares_each_mode_with_transformers(bench):
    import throughput

    def ok(rate, tokens, forwards, batch=1):
        return run(tokens_per_s=rate, generated_all=tokens, generate_forward_s=[0.1] * forwards, batch=batch,
                   new_tokens=8, peak_rss=2**30)

    runs = {"batch 8": {"transformers": [ok(2.0, [[1]], 8, 8)], "hf_bigmodel": [ok(6.0, [[1]], 8, 8)]},
            "batch 1 + draft": {"transformers": [ok(1.0, [[2]], 3)], "hf_bigmodel": [ok(2.5, [[3]], 3)]}}
    text = throughput.table(runs)
    assert "| batch 8 | hf_bigmodel | 6.00 | 3.00x | 8.00 | yes | 1.00 GiB | OK |" in text
    assert "| batch 1 + draft | hf_bigmodel | 2.50 | 2.50x | 2.67 | NO |" in text  # other tokens: said


def test_the_draft_model_predicts_what_the_drafted_target_says(bench, tmp_path, monkeypatch):
    import draft_pair
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(draft_pair, "RANK", 16)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "source")
    target_dir, draft_dir = draft_pair.build_pair(tmp_path, tmp_path / "source")
    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(str(draft_dir), dtype=torch.float32).eval()
    ids = torch.randint(3, 512, (64, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        agree = (target(ids).logits[:, -1].argmax(-1) == draft(ids).logits[:, -1].argmax(-1)).float().mean()
    assert agree >= 0.6  # a useful draft, as a trained pair's
    assert draft_pair.build_pair(tmp_path, tmp_path / "source") == (target_dir, draft_dir)  # built once


def test_a_loader_at_another_budget_is_its_own_row_of_the_cold_scenario(bench):
    import run as harness

    assert harness.split_loader("hf_bigmodel@0", "600MiB") == ("hf_bigmodel", "0")
    assert harness.split_loader("transformers", "600MiB") == ("transformers", "600MiB")
    args = harness.parse_args(["--loaders", "transformers,hf_bigmodel,hf_bigmodel@100MiB"])
    assert args.loader_list == ["transformers", "hf_bigmodel", "hf_bigmodel@100MiB"]
    for bad in ("nope@0", "hf_bigmodel@lots"):
        with pytest.raises(SystemExit):
            harness.parse_args(["--loaders", bad])
