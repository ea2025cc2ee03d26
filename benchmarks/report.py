"""Summaries, tables and the memory-formula check for the benchmark results (pure functions, no I/O)."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from loaders import ANCHORS

from hf_bigmodel.model.sizes import format_size

#: (result key, column title, is a byte count). Lower is better in every column.
COLUMNS: list[tuple[str, str, bool]] = [
    ("load_s", "load s", False),
    ("forward_s", "first forward (32 tok) s", False),
    ("generate_s", "8 greedy tokens s", False),
    ("peak_rss", "peak RSS", True),
    ("cgroup_peak", "cgroup peak (RSS + cache)", True),
]
_RATIO_KEYS = ("load_s", "forward_s", "generate_s", "peak_rss")
_ERROR_WIDTH = 90  # the table shows this much of an error; results.json keeps all of it


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each measured column over the runs that reached it, and a status line.

    ``logits_max_diff`` takes the worst run; ``status`` is ``OK`` only when every run was OK, otherwise
    e.g. ``"KILLED 1/2, OK 1/2"``, followed by the first error's last line.
    """
    summary: dict[str, Any] = {"runs": len(runs)}
    ok = [r for r in runs if r["status"] == "OK"]
    # Figures come from the OK runs; with none, from runs cut short (the phases they finished), never
    # from runs that failed (their peak RSS is that of a process that did nothing).
    measured = ok or [r for r in runs if r["status"] in ("KILLED", "TIMEOUT")]
    for key, _, _ in COLUMNS:
        values = [r[key] for r in measured if isinstance(r.get(key), (int, float))]
        summary[key] = statistics.median(values) if values else None
    diffs = [r["logits_max_diff"] for r in ok if isinstance(r.get("logits_max_diff"), (int, float))]
    summary["logits_max_diff"] = max(diffs) if diffs else None
    matches = [r["tokens_match"] for r in ok if "tokens_match" in r]
    summary["tokens_match"] = all(matches) if matches else None
    counts = Counter(r["status"] for r in runs)
    if set(counts) == {"OK"}:
        summary["status"] = "OK"
    else:
        parts = [f"{s} {n}/{len(runs)}" for s, n in counts.most_common()]
        first_bad = next(r for r in runs if r["status"] != "OK")
        detail = first_bad.get("error") or ""
        if len(detail) > _ERROR_WIDTH:
            detail = detail[: _ERROR_WIDTH - 3] + "..."
        if first_bad.get("phase") and first_bad["status"] in ("KILLED", "TIMEOUT"):
            detail = f"during {first_bad['phase']}" + (f"; {detail}" if detail else "")
        summary["status"] = ", ".join(parts) + (f" ({detail})" if detail else "")
    reads = [r["generate_read_bytes"] for r in ok if isinstance(r.get("generate_read_bytes"), int)]
    summary["generate_read_bytes"] = statistics.median(reads) if reads else None
    summary["forwards"] = next((len(r["generate_forward_s"]) for r in ok if r.get("generate_forward_s")), None)
    summary["prefetch"] = next((r["prefetch"] for r in ok if r.get("prefetch")), None)
    activations = [r["activation_bytes"] for r in ok if isinstance(r.get("activation_bytes"), int)]
    summary["activation_bytes"] = max(activations) if activations else 0
    loaded = [r["rss_after_load"] - (r.get("bytes_per_device") or {}).get("cpu", 0) for r in ok
              if isinstance(r.get("rss_after_load"), int)]
    summary["loaded_rss_beside_weights"] = max(loaded) if loaded else None
    summary["largest_disk_block"] = next(
        (r["largest_block_per_device"]["disk"] for r in ok if "disk" in (r.get("largest_block_per_device") or {})),
        None,
    )
    summary["disk_bytes"] = next(
        ((r.get("bytes_per_device") or {}).get("disk") for r in ok if (r.get("bytes_per_device") or {}).get("disk")),
        None,
    )
    return summary


def compute_times(runs: list[dict[str, Any]]) -> list[float] | None:
    """Per-forward compute times of generation with every weight in RAM: the median of each forward over ``runs``."""
    series = [r["generate_forward_s"] for r in runs if r.get("status") == "OK" and r.get("generate_forward_s")]
    if not series or len({len(s) for s in series}) != 1:
        return None
    return [statistics.median(values) for values in zip(*series)]


def floor(summary: dict[str, Any], *, compute: list[float] | None, bandwidth: float | None) -> dict[str, Any] | None:
    """Generation time against the least it can take: ``sum over forwards of max(compute, bytes read / bandwidth)``.

    ``compute`` holds each forward's time with every weight in RAM (same prompts, same kernels); the bytes
    are what the run read from storage during generation (``/proc/self/io``), split evenly over its
    forwards (every forward needs the same offloaded weights); ``bandwidth`` is one O_DIRECT reader's,
    measured in the same benchmark run. A loader that overlaps its reads with compute perfectly and reads
    at the disk's speed is at 1.0x; the sum of the two terms (no overlap) is reported beside it.
    """
    seconds, read, forwards = summary.get("generate_s"), summary.get("generate_read_bytes"), summary.get("forwards")
    if not seconds or read is None or not bandwidth or not compute or forwards != len(compute):
        return None
    per_read = read / forwards / bandwidth
    bound = sum(max(c, per_read) for c in compute)
    serial = sum(compute) + forwards * per_read
    disk_bound = sum(per_read >= c for c in compute)
    return {
        "floor_s": bound,
        "ratio": seconds / bound,
        "serial_s": serial,
        "text": (f"{forwards} forwards {seconds:.2f} s = {seconds / bound:.2f}x the floor of {bound:.2f} s (sum over "
                 f"forwards of max(in-RAM compute, bytes read / {bandwidth / 1e9:.2f} GB/s); compute {sum(compute):.2f} s "
                 f"in all, {format_size(read / forwards)} read per forward = {per_read:.2f} s; disk-bound in "
                 f"{disk_bound} of {forwards} forwards; compute + reads without overlap would take {serial:.2f} s, "
                 f"{seconds / serial:.2f}x of it)"),
    }


def floor_around(runs: list[dict[str, Any]], *, compute: list[float] | None) -> dict[str, Any] | None:
    """Each OK run against its own floor, its bandwidth measured just before and after it (the faster of the two).

    The disk of a shared machine swings by a third within minutes, so a bandwidth measured once in the
    session can be far from the one a run met. Taking the faster of the two passes around a run keeps the
    floor on the strict side. Returns the median ratio over the runs and the bandwidths used.
    """
    ratios, bandwidths = [], []
    for run in runs:
        around = [b for b in run.get("disk_bandwidth_around") or [] if b]
        seconds, read, times = run.get("generate_s"), run.get("generate_read_bytes"), run.get("generate_forward_s")
        if run.get("status") != "OK" or not around or not seconds or read is None or not compute or not times:
            continue
        if len(times) != len(compute):
            continue
        bandwidth = max(around)
        per_read = read / len(times) / bandwidth
        ratios.append(seconds / sum(max(c, per_read) for c in compute))
        bandwidths.append(bandwidth)
    if not ratios:
        return None
    ratio = statistics.median(ratios)
    span = f"{min(bandwidths) / 1e9:.2f}-{max(bandwidths) / 1e9:.2f}" if len(bandwidths) > 1 else f"{bandwidths[0] / 1e9:.2f}"
    busy = disk_busy(runs)
    return {
        "ratio": ratio, "ratios": ratios, "bandwidths": bandwidths, "disk_busy": busy,
        "text": (f"against each run's own floor, from the disk's speed just before and after it (the faster pass, "
                 f"{span} GB/s): {ratio:.2f}x (median of {len(ratios)}; runs {', '.join(f'{r:.2f}' for r in ratios)})"
                 + (f"; the disk was busy for {busy:.0%} of generation (median; the rest, reads left it idle)"
                    if busy is not None else "")),
    }


def disk_busy(runs: list[dict[str, Any]]) -> float | None:
    """The median share of generation during which the checkpoint's disk had a read in flight (``io_ticks``).

    A disk-bound run at the floor keeps it near 100%; below that, the loader left the disk idle while
    it computed. Other processes reading the same disk would count as busy: the benchmark runs alone."""
    shares = [run["generate_disk_busy_s"] / run["generate_s"] for run in runs
              if run.get("status") == "OK" and run.get("generate_disk_busy_s") is not None and run.get("generate_s")]
    return min(statistics.median(shares), 1.0) if shares else None


def best_anchor(summaries: dict[str, dict[str, Any]], key: str) -> tuple[str, float] | None:
    """The anchor (transformers or accelerate) with the lowest value in column ``key``."""
    candidates = [(summaries[a][key], a) for a in ANCHORS if a in summaries and summaries[a].get(key)]
    if not candidates:
        return None
    value, name = min(candidates)
    return name, value


def ratios(summaries: dict[str, dict[str, Any]], loader: str) -> dict[str, float]:
    """``loader``'s figures divided by the best anchor's, column by column (< 1 means hf_bigmodel wins)."""
    out: dict[str, float] = {}
    for key in _RATIO_KEYS:
        best = best_anchor(summaries, key)
        value = summaries[loader].get(key)
        if best and value:
            out[key] = value / best[1]
    return out


def _cell(value: Any, is_bytes: bool) -> str:
    if value is None:
        return "-"
    return format_size(value) if is_bytes else f"{value:.2f}"


def table(summaries: dict[str, dict[str, Any]], *, markdown: bool) -> str:
    """One row per loader; hf_bigmodel cells carry ``(0.64x)``, their ratio to the best anchor.

    Columns no loader has a figure for (the cgroup peak of uncapped runs) are left out.
    """
    columns = [c for c in COLUMNS if any(s.get(c[0]) is not None for s in summaries.values())]
    header = ["loader"] + [title for _, title, _ in columns] + ["logits max diff", "tokens match", "status"]
    rows = []
    for loader, summary in summaries.items():
        rel = ratios(summaries, loader) if loader not in ANCHORS else {}
        cells = [loader]
        for key, _, is_bytes in columns:
            cell = _cell(summary.get(key), is_bytes)
            if key in rel:
                cell += f" ({rel[key]:.2f}x)"
            cells.append(cell)
        diff = summary.get("logits_max_diff")
        cells.append("-" if diff is None else f"{diff:.3g}")
        match = summary.get("tokens_match")
        cells.append("-" if match is None else ("yes" if match else "NO"))
        cells.append(summary["status"])
        rows.append(cells)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)])


def memory_formula(summary: dict[str, Any], *, cpu_budget: int, baseline: dict[str, Any]) -> dict[str, Any] | None:
    """Check ``peak RSS <= baseline + dispatch + cpu budget + prefetch memory bound + activations`` for a run
    that reported its prefetcher.

    The baseline is the RSS of a process that imported torch, transformers, the model's modules and
    hf_bigmodel and built the empty model; dispatch is what the loaded model holds beyond it and beyond
    the weights it placed on the CPU (hooks, headers, the reader thread: RSS after load - weights on
    CPU - baseline); the prefetch bound is the prefetcher's own (``largest group + window`` with a window
    of bytes, ``(groups + 1) x largest group`` with a number of groups); activations are the runner's
    estimate (the prompt's logits and the KV cache, ``runner.activation_bytes``).
    """
    peak, stats = summary.get("peak_rss"), summary.get("prefetch")
    if peak is None or not stats or not baseline.get("baseline_rss"):
        return None
    activations = summary.get("activation_bytes") or 0
    base = baseline["baseline_rss"]
    beside = summary.get("loaded_rss_beside_weights")
    dispatch = max(0, beside - base) if beside is not None else 0
    bound = base + dispatch + cpu_budget + stats["memory_bound"] + activations
    window = (f"{format_size(stats['largest_group'])} largest group + {format_size(stats['window_bytes'])} window"
              if stats.get("window_bytes") is not None else f"({stats['depth']}+1) x {format_size(stats['largest_group'])}")
    return {
        "peak_rss": peak,
        "bound": bound,
        "holds": peak <= bound,
        "text": (
            f"peak RSS {format_size(peak)} {'<=' if peak <= bound else '>'} {format_size(bound)} = "
            f"{format_size(base)} baseline + {format_size(dispatch)} dispatch + {format_size(cpu_budget)} budget + "
            f"{window} + {format_size(activations)} activations: {'HOLDS' if peak <= bound else 'EXCEEDED'}"
        ),
    }

SCALE_HEADER = ("| size | loader | s per token (decode) | floor s per token | x floor | read per token | peak RSS | "
                "status |\n|---|---|---|---|---|---|---|---|")


#: Below this many bytes read per forward, a scale row shows no floor (the ratio to ~0 s would mean nothing).
SCALE_READ_FLOOR = 2**20


def scale_rows(size: str, entry: dict[str, Any], *, new_tokens: int) -> list[str]:
    """One markdown row per loader of one size of the scale scenario.

    Time per token is the median decode forward (the prompt's forward left out); the floor of a token is
    what that loader read from storage per forward over the disk's O_DIRECT bandwidth measured right after.
    A loader that read under :data:`SCALE_READ_FLOOR` per forward (the page cache served it) gets no floor:
    its tokens are bound by compute, which this table does not measure.
    """
    rows = []
    bandwidth = entry.get("bandwidth")
    for loader, run in entry["runs"].items():
        forwards = run.get("generate_forward_s") or []
        decode = statistics.median(forwards[1:]) if len(forwards) > 1 else None
        read = run.get("generate_read_bytes")
        per_forward = read / len(forwards) if read is not None and forwards else None
        read_enough = per_forward is not None and per_forward >= SCALE_READ_FLOOR
        floor = per_forward / bandwidth if read_enough and bandwidth else None
        cells = [
            f"{size} ({format_size(entry['bytes'])})", loader,
            f"{decode:.2f}" if decode else "-",
            f"{floor:.2f}" if floor else "-",
            f"{decode / floor:.2f}x" if decode and floor else "-",
            format_size(per_forward) if per_forward is not None else "-",
            format_size(run["peak_rss"]) if run.get("peak_rss") and run.get("status") == "OK" else "-",
            run.get("status", "?") + (f" ({run['error']})" if run.get("status") != "OK" and run.get("error") else ""),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows
