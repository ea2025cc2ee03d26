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


def test_memory_formula_and_disk_floor(bench):
    report, _ = bench
    mib = 2**20
    baseline = {"baseline_rss": 376 * mib, "decoder_layer_bytes": 86 * mib}
    summary = {"peak_rss": 1260 * mib, "largest_disk_block": {"module": "lm_head", "bytes": 125 * mib},
               "generate_s": 4.0, "disk_bytes": 1.5e9}
    check = report.memory_formula(summary, cpu_budget=600 * mib, prefetch_depth=2, baseline=baseline)
    assert check["bound"] == (600 + 3 * 125 + 376) * mib and check["holds"]
    assert "(2+1) x 125.00 MiB (lm_head)" in check["text"] and check["text"].endswith("HOLDS")
    over = report.memory_formula({**summary, "peak_rss": 1400 * mib}, cpu_budget=600 * mib, prefetch_depth=2,
                                 baseline=baseline)
    assert not over["holds"] and over["text"].endswith("EXCEEDED")
    floor = report.disk_floor(summary, bandwidth=3e9, forwards=8)
    assert floor["floor_s"] == pytest.approx(4.0) and floor["ratio"] == pytest.approx(1.0)
    assert report.disk_floor(summary, bandwidth=None, forwards=8) is None
    assert report.disk_floor({**summary, "disk_bytes": None}, bandwidth=3e9, forwards=8) is None


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
