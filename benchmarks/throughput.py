"""The throughput scenario: tokens/s when one read of the offloaded weights serves many tokens.

Each forward of an offloaded model reads its offloaded weights once, whatever it computes. Two ways
make that read serve more tokens: a batch of prompts (every sequence advances by one token per
forward), and assisted generation (a small draft model kept in RAM proposes tokens; one forward of the
big model checks several at once). Both run here side by side with transformers under the cold
scenario's settings, on the drafted target of :mod:`draft_pair` (the benchmark checkpoint's shape, built
so that its draft agrees with it most of the time, as a trained pair does).

Modes: batch 1, 8 and 32 (all prompts the same length: no padding), and batch 1 with the draft
(transformers' assisted generation takes one sequence).
"""

from __future__ import annotations

from typing import Any

from hf_bigmodel.model.sizes import format_size

#: (name, batch, with the draft model)
MODES: list[tuple[str, int, bool]] = [("batch 1", 1, False), ("batch 8", 8, False), ("batch 32", 32, False),
                                      ("batch 1 + draft", 1, True)]
#: Room for activations of batch 32 and for the draft model, on top of the cold scenario's cgroup limit.
HEADROOM = 512 * 2**20


def run_modes(harness: Any, loaders: list[str], *, target: Any, draft: Any, memory_limit: int, repeat: int,
              evict: Any) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every mode x loader x repeat in a fresh process, interleaved; results by mode, then loader."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {name: [] for name in loaders} for m, _, _ in MODES}
    for index in range(repeat):
        for mode, batch, assisted in MODES:
            for loader in loaders:
                evict()
                extra = ["--batch", str(batch), "--max-memory-cpu", harness.args.cpu_budget,
                         "--offload-folder", str(harness.offload)]
                if assisted:
                    extra += ["--assistant", str(draft)]
                tag = f"throughput-{mode.replace(' ', '').replace('+', '-')}-{loader}-{index}"
                runs[mode][loader].append(harness.launch(loader, tag, extra=extra, checkpoint=target,
                                                         memory_limit=memory_limit + HEADROOM))
    return runs


def _median(values: list[float]) -> float | None:
    values = sorted(values)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def table(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """Markdown: tokens/s per mode and loader, hf_bigmodel's against transformers' in the same mode."""
    lines = ["| mode | loader | tokens/s | x transformers | tokens per forward of the big model | "
             "same tokens as transformers | peak RSS | status |", "|---|---|---|---|---|---|---|---|"]
    for mode, by_loader in runs.items():
        rates = {loader: _median([r["tokens_per_s"] for r in rs if r.get("status") == "OK"])
                 for loader, rs in by_loader.items()}
        reference = next((r.get("generated_all") for r in by_loader.get("transformers", [])
                          if r.get("status") == "OK"), None)
        for loader, rs in by_loader.items():
            ok = [r for r in rs if r.get("status") == "OK"]
            rate = rates[loader]
            base = rates.get("transformers")
            per_forward = _median([r["batch"] * r["new_tokens"] / len(r["generate_forward_s"]) for r in ok
                                   if r.get("generate_forward_s")])
            same = "-" if reference is None or not ok else (
                "yes" if all(r.get("generated_all") == reference for r in ok) else "NO")
            peak = _median([r["peak_rss"] for r in ok if r.get("peak_rss")])
            status = "OK" if len(ok) == len(rs) else ", ".join(sorted({r.get("status", "?") for r in rs}))
            lines.append("| " + " | ".join([
                mode, loader, f"{rate:.2f}" if rate else "-",
                f"{rate / base:.2f}x" if rate and base and loader != "transformers" else "-",
                f"{per_forward:.2f}" if per_forward else "-", same,
                format_size(peak) if peak else "-", status]) + " |")
    return "\n".join(lines)
