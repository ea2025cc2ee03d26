"""Side-by-side benchmark: hf_bigmodel against transformers and accelerate on a ~1B Llama checkpoint.

One command builds the checkpoint (once, cached), then runs every loader in a fresh process per
scenario and repeat, and prints one table per scenario::

    python benchmarks/run.py                                  # both scenarios, all loaders, 1 repeat
    python benchmarks/run.py --scenarios cold --repeat 3 --loaders accelerate,hf_bigmodel
    python benchmarks/run.py --scenarios cold --loaders transformers,hf_bigmodel,hf_bigmodel@0  # + a row at budget 0
    python benchmarks/run.py --gpu                            # the separate GPU offload benchmark

Scenarios: ``warm`` (checkpoint in the page cache, no memory cap) and ``cold`` (checkpoint evicted
from the page cache, ``max_memory={"cpu": "600MiB"}`` with the rest offloaded to disk, and the runner
confined to a 1.3 GB memory cgroup when this process may create one). A loader written ``NAME@SIZE``
(``hf_bigmodel@0``) is an extra row of the cold scenario run with its own ``max_memory["cpu"]``: the
same loader at another budget, e.g. one whose peak RSS matches an anchor's. Results go to
``<work-dir>/results.json`` and ``<work-dir>/results.md``. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.metadata
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))

import build_checkpoint
import draft_pair
import report
import system
import throughput
from loaders import LOADERS

from hf_bigmodel.model.sizes import format_size, parse_size

logger = logging.getLogger("benchmarks.run")

SCENARIOS = {
    "warm": "warm page cache, no memory cap",
    "cold": "cold page cache, max_memory={'cpu': <budget>} (rest offloaded to disk), memory cgroup",
    "throughput": "as cold, on the drafted target: tokens/s at batch 1, 8, 32 and with a draft model in RAM",
}


class Harness:
    """Runs the loaders in fresh processes and collects their JSON results."""

    def __init__(self, args: argparse.Namespace, checkpoint: Path) -> None:
        self.args = args
        self.checkpoint = checkpoint
        self.work = args.work_dir
        self.reference = self.work / f"{checkpoint.name}.reference.pt"
        self.offload = self.work / "offload"
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
        self.env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.cgroup_note = ""
        self.compute_runs: list[dict[str, Any]] = []  # in-RAM generation of the last cold scenario (the floor)
        self._counter = 0

    def launch(self, loader: str, tag: str, *, extra: list[str], memory_limit: int | None,
               checkpoint: Path | None = None) -> dict[str, Any]:
        """Run ``runner.py --loader <loader>`` in a fresh process; never raises for the child's failures."""
        self._counter += 1
        result_path = self.logs / f"{tag}.json"
        log_path = self.logs / f"{tag}.log"
        result_path.unlink(missing_ok=True)
        cmd = [sys.executable, str(HERE / "runner.py"), "--loader", loader, "--checkpoint", str(checkpoint or self.checkpoint),
               "--result", str(result_path), *extra]
        group = None
        if memory_limit is not None and not self.args.no_cgroup:
            group, why = system.MemoryCgroup.create(f"hfbm_bench_{os.getpid()}_{self._counter}", limit=memory_limit)
            if group is None:
                self.cgroup_note = f"runs NOT memory-capped: {why}"
                logger.warning(self.cgroup_note)
        timed_out = False
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
                                    preexec_fn=group.join if group else None)  # noqa: PLW1509 (no threads here)
            try:
                rc = proc.wait(timeout=self.args.run_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
                timed_out = True
        wall = time.perf_counter() - started
        try:
            result = json.loads(result_path.read_text())
        except (OSError, ValueError):
            result = {"phase": "start (no result written)"}
        result["wall_s"] = wall
        result["loadavg_before"] = load_before
        result["returncode"] = rc
        result["log"] = str(log_path)
        oom_kills = 0
        if group is not None:
            result["cgroup_peak"] = group.peak_bytes()
            result["cgroup_limit"] = memory_limit
            oom_kills = group.oom_kills()
            group.remove()
        if timed_out:
            result.update(status="TIMEOUT", error=f"no result after {self.args.run_timeout} s (--run-timeout)")
        elif oom_kills or rc == -signal.SIGKILL:
            limit = f" of the {format_size(memory_limit)} cgroup" if memory_limit else ""
            result.update(status="KILLED", error=f"killed by the OOM killer{limit}" if oom_kills else "SIGKILL")
        elif result.get("status") not in ("OK", "FAILED"):
            result["status"] = "CRASHED"
            result["error"] = f"exit code {rc}: {_last_line(log_path)}"
        logger.info("  %-24s %-8s %5.1f s  %s", loader, result["status"], wall, result.get("error") or "")
        return result

    def ensure_reference(self) -> None:
        """Reference logits and tokens from a warm transformers run (cached next to the checkpoint)."""
        if self.reference.is_file():
            return
        logger.info("computing reference logits with transformers (warm, uncapped)")
        system.warm_page_cache([self.checkpoint])
        result = self.launch("transformers", "reference", extra=["--save-reference", str(self.reference)],
                             memory_limit=None)
        if result["status"] != "OK":
            logger.warning("no reference logits (%s); logits will not be compared", result.get("error"))

    def baseline(self) -> dict[str, Any]:
        """RSS after importing torch + transformers and building the empty model; decoder layer size."""
        result = self.launch("baseline", "baseline", extra=[], memory_limit=None)
        if result["status"] != "OK":
            logger.warning("baseline measurement failed: %s", result.get("error"))
        return result

    def run_scenario(self, scenario: str, loaders: list[str]) -> dict[str, list[dict[str, Any]]]:
        """Every loader ``--repeat`` times, interleaved (round-robin) so drifts hit all loaders alike.

        ``NAME@SIZE`` rows (another CPU budget) run in the cold scenario only: the warm one has no budget.
        """
        args = self.args
        cold = scenario == "cold"
        if not cold:
            loaders = [spec for spec in loaders if "@" not in spec]
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in loaders}
        self.compute_runs = []
        for repeat in range(args.repeat):
            for spec in loaders:
                loader, budget = split_loader(spec, args.cpu_budget)
                extra = ["--reference", str(self.reference)]
                if cold:
                    system.reset_folder(self.offload)
                    system.evict_from_page_cache([self.checkpoint])
                    extra += ["--max-memory-cpu", budget, "--offload-folder", str(self.offload)]
                else:
                    system.warm_page_cache([self.checkpoint])
                cached, total = system.resident_bytes([self.checkpoint])
                # The disk's speed swings by a third within minutes: read it just before and after each run.
                before = system.direct_read_bandwidth([self.checkpoint], repeat=1) if cold else None
                result = self.launch(loader, f"{scenario}-{spec}-{repeat}", extra=extra,
                                     memory_limit=parse_size(args.memory_limit) if cold else None)
                if cold:
                    result["disk_bandwidth_around"] = [before, system.direct_read_bandwidth([self.checkpoint], repeat=1)]
                result["checkpoint_cached_before"] = cached
                result["checkpoint_bytes"] = total
                if cold:
                    result["cpu_budget"] = budget
                    result["offload_folder_bytes"] = sum(f.stat().st_size for f in system.iter_files([self.offload]))
                    system.reset_folder(self.offload)
                runs[spec].append(result)
            if cold:  # the same generation with every weight in RAM: each forward's compute time, for the floor
                system.warm_page_cache([self.checkpoint])
                self.compute_runs.append(self.launch("transformers", f"compute-{scenario}-{repeat}",
                                                     extra=["--reference", str(self.reference)], memory_limit=None))
        return runs


def split_loader(spec: str, default_budget: str) -> tuple[str, str]:
    """``"hf_bigmodel@0"`` -> ``("hf_bigmodel", "0")``; a plain name gets ``default_budget``.

    >>> split_loader("hf_bigmodel@200MiB", "600MiB"), split_loader("transformers", "600MiB")
    (('hf_bigmodel', '200MiB'), ('transformers', '600MiB'))
    """
    name, _, budget = spec.partition("@")
    return name, budget or default_budget


def _throughput(harness: Harness, args: argparse.Namespace, checkpoint: Path) -> tuple[dict[str, Any], str]:
    target, draft = draft_pair.build_pair(args.work_dir, checkpoint)
    loaders = [name for name in args.loader_list if name in ("transformers", "accelerate", "hf_bigmodel")]

    def evict() -> None:
        system.reset_folder(harness.offload)
        system.evict_from_page_cache([target])

    runs = throughput.run_modes(harness, loaders, target=target, draft=draft, repeat=args.repeat, evict=evict,
                                memory_limit=parse_size(args.memory_limit))
    text = throughput.table(runs)
    busiest = max((r.get("loadavg_before", 0.0) for m in runs.values() for rs in m.values() for r in rs), default=0)
    if busiest > args.busy_load:
        text += f"\n\nnote: other processes were busy (1-min load average up to {busiest:.1f}): figures are noisy"
    return {"description": SCENARIOS["throughput"], "runs": runs}, text


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1].strip() if lines else "(empty log)"


def _versions() -> dict[str, str]:
    out = {}
    for package in ("torch", "transformers", "accelerate", "safetensors", "hf_bigmodel"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "source" if package == "hf_bigmodel" else "missing"
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loaders", default=",".join(LOADERS), help=f"comma-separated, from {', '.join(LOADERS)}")
    parser.add_argument("--scenarios", default="warm,cold", help="comma-separated, from warm, cold, throughput")
    parser.add_argument("--repeat", type=int, default=1, help="runs per loader and scenario; the median is shown")
    parser.add_argument("--work-dir", type=Path, default=HERE / "_work", help="checkpoint, logs and results")
    parser.add_argument("--cpu-budget", default="600MiB", help="max_memory['cpu'] in the cold scenario")
    parser.add_argument("--memory-limit", default="1.3GB", help="memory cgroup limit of a cold-scenario runner")
    parser.add_argument("--no-cgroup", action="store_true", help="never confine runners to a memory cgroup")
    parser.add_argument("--prefetch", default=None, help="hf_bigmodel's prefetch window for its runs: a size "
                        "('256MiB'), a number of groups, or 0 (default: the library's, twice the median group)")
    parser.add_argument("--run-timeout", type=float, default=300, help="seconds before a runner is killed")
    parser.add_argument("--busy-load", type=float, default=1.0, help="flag a scenario as noisy when the 1-min "
                        "load average exceeds this when a run starts")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the checkpoint even if cached")
    parser.add_argument("--gpu", action="store_true", help="run the GPU offload benchmark instead (needs CUDA)")
    args, rest = parser.parse_known_args(argv)
    args.gpu_args = rest
    if rest and not args.gpu:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    problems = []
    args.loader_list = [name.strip() for name in args.loaders.split(",") if name.strip()]
    unknown = [spec for spec in args.loader_list if split_loader(spec, "")[0] not in LOADERS]
    if unknown:
        problems.append(f"unknown loader(s) {', '.join(unknown)}; choose from {', '.join(LOADERS)} "
                        "(NAME@SIZE: that loader at another CPU budget, cold scenario only)")
    for spec in args.loader_list:
        if "@" in spec:
            try:
                parse_size(split_loader(spec, "")[1], what=f"the budget of --loaders {spec}")
            except ValueError as exc:
                problems.append(str(exc))
    args.scenario_list = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    bad = [name for name in args.scenario_list if name not in SCENARIOS]
    if bad:
        problems.append(f"unknown scenario(s) {', '.join(bad)}; choose from {', '.join(SCENARIOS)}")
    if args.repeat < 1:
        problems.append(f"--repeat must be >= 1, got {args.repeat}")
    for option in ("cpu_budget", "memory_limit"):
        try:
            parse_size(getattr(args, option), what=f"--{option.replace('_', '-')}")
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        parser.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.work_dir = args.work_dir.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.gpu:
        import gpu

        gpu.main(args.gpu_args, work_dir=args.work_dir)
        return

    if args.prefetch is not None:
        from hf_bigmodel.runtime.prefetch_window import ENV_VAR, prefetch_window

        prefetch_window(args.prefetch)  # a bad value fails here, not in every runner
        os.environ[ENV_VAR] = args.prefetch  # the runners inherit it
    checkpoint = build_checkpoint.checkpoint_dir(args.work_dir)
    if args.rebuild or not build_checkpoint.is_built(checkpoint):
        (args.work_dir / f"{checkpoint.name}.reference.pt").unlink(missing_ok=True)
        logger.info("building the checkpoint (once; ~1 min)")
        subprocess.run([sys.executable, str(HERE / "build_checkpoint.py"), "--work-dir", str(args.work_dir),
                        *(["--force"] if args.rebuild else [])], check=True)
    # Byte-compile hf_bigmodel as pip does when it installs a package: an editable checkout on a machine
    # with PYTHONDONTWRITEBYTECODE set would otherwise compile its sources in every run's load.
    compileall.compile_dir(str(REPO / "src" / "hf_bigmodel"), quiet=1)
    harness = Harness(args, checkpoint)
    harness.ensure_reference()
    baseline = harness.baseline()

    results: dict[str, Any] = {
        "machine": system.machine_description(),
        "disk": system.disk_description(args.work_dir),
        "versions": _versions(),
        "checkpoint": {"path": str(checkpoint), "bytes": sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")),
                       "shape": build_checkpoint.MODEL_SHAPE},
        "settings": {k: v for k, v in vars(args).items() if k not in ("gpu_args",)},
        "baseline": baseline,
        "scenarios": {},
    }
    md = [f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, {results['machine']['ram']} "
          f"RAM, Linux {results['machine']['kernel']}, disk {results['disk']}; "
          + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + "."]
    disk_bandwidth: float | None = None  # measured once, before the first cold scenario's checks
    for scenario in args.scenario_list:
        logger.info("scenario %s: %s", scenario, SCENARIOS[scenario])
        if scenario == "throughput":
            entry, text = _throughput(harness, args, checkpoint)
            results["scenarios"][scenario] = entry
            print(f"\n== throughput: {SCENARIOS[scenario]} (median of {args.repeat})\n{text}")
            md += [f"\n### throughput: {SCENARIOS[scenario]} (median of {args.repeat})\n", text]
            continue
        harness.cgroup_note = ""
        runs = harness.run_scenario(scenario, args.loader_list)
        summaries = {loader: report.summarize_runs(r) for loader, r in runs.items()}
        entry: dict[str, Any] = {"description": SCENARIOS[scenario], "runs": runs, "summary": summaries}
        notes = []
        busiest = max((r.get("loadavg_before", 0.0) for rs in runs.values() for r in rs), default=0.0)
        if busiest > args.busy_load:
            notes.append(f"other processes were busy (1-min load average up to {busiest:.1f} on "
                         f"{os.cpu_count()} cores when a run started): figures are noisy, use --repeat")
        if scenario == "cold":
            notes.append(harness.cgroup_note or (f"runners confined to a {args.memory_limit} memory cgroup"
                                                 if not args.no_cgroup else "runs NOT memory-capped (--no-cgroup)"))
            checks = {}
            for loader, summary in summaries.items():
                budget = parse_size(split_loader(loader, args.cpu_budget)[1])
                check = report.memory_formula(summary, cpu_budget=budget, baseline=baseline)
                if check:
                    checks[loader] = check
            entry["memory_formula"] = checks
            if disk_bandwidth is None:
                disk_bandwidth = system.direct_read_bandwidth([checkpoint])
                results["disk_read_bytes_per_s"] = disk_bandwidth
            compute = report.compute_times(harness.compute_runs)
            entry["compute_runs"] = harness.compute_runs
            entry["compute_forward_s"] = compute
            floors = {}
            for loader, summary in summaries.items():
                floor = report.floor(summary, compute=compute, bandwidth=disk_bandwidth)
                if floor:
                    floors[loader] = floor
                    around = report.floor_around(runs[loader], compute=compute)
                    if around:
                        floor["around"] = around
                        floor["text"] += f"; {around['text']}"
            entry["floor"] = floors
        entry["notes"] = notes
        results["scenarios"][scenario] = entry
        title = f"{scenario}: {SCENARIOS[scenario].replace('<budget>', args.cpu_budget)}"
        print(f"\n== {title} (median of {args.repeat})")
        print(report.table(summaries, markdown=False))
        for note in notes:
            print(f"note: {note}")
        for loader, check in entry.get("memory_formula", {}).items():
            print(f"memory formula, {loader}: {check['text']}")
        for loader, floor in entry.get("floor", {}).items():
            print(f"floor, {loader}: {floor['text']}")
        md += [f"\n### {title} (median of {args.repeat})\n", report.table(summaries, markdown=True)]
        md += [f"\n{note}" for note in notes]
        md += [f"\nMemory formula, {loader}: {c['text']}" for loader, c in entry.get("memory_formula", {}).items()]
        md += [f"\nFloor, {loader}: {f['text']}" for loader, f in entry.get("floor", {}).items()]

    (args.work_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (args.work_dir / "results.md").write_text("\n".join(md) + "\n")
    print(f"\nresults: {args.work_dir / 'results.json'}, {args.work_dir / 'results.md'}")


if __name__ == "__main__":
    main()
