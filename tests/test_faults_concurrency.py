"""Several processes filling one offload folder at once.

A torch checkpoint must be converted into the offload folder before its disk-mapped weights can be read.
Processes started together (spawn, released by a barrier) all write the same content-named files; each
must still get exactly the reference outputs, and the folder must end consistent: no temporary files,
an index that loads, and every stored tensor equal to the checkpoint's.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from pathlib import Path

import pytest
import torch
from core_models import TinyLM, reference_tiny_lm, save_state

from hf_bigmodel import init_empty_weights, load_checkpoint_and_dispatch
from hf_bigmodel.storage.offload_folder import load_offload_index
from hf_bigmodel.storage.safetensors_io import read_header
from hf_bigmodel.storage.weights_map import WeightsMap

IDS = [[1, 5, 9, 3], [7, 2, 0, 4]]
DIM = 32
MAP = {"embed": "cpu", "blocks.0": "disk", "blocks.1": "disk", "blocks.2": "cpu", "blocks.3": "disk",
       "norm": "disk", "head": "cpu"}
TIMEOUT = 120
N_PROCESSES = 3  # each spawned child imports torch: 3 keep the test well under a minute on 2 cores


def _load_and_run(rank: int, checkpoint: str, offload: str, waves: int, barrier, results) -> None:
    """Child process: for each wave, wait for the others, load an empty model through the shared folder, run.

    Between waves the parent (the barrier's last party) inspects and damages the folder.
    """
    for _ in range(waves):
        try:
            with init_empty_weights():
                model = TinyLM(dim=DIM)
            barrier.wait(timeout=TIMEOUT)  # every process starts loading at once
            model = load_checkpoint_and_dispatch(model, checkpoint, device_map=MAP, offload_folder=offload)
            with torch.no_grad():
                results.put((rank, model(torch.tensor(IDS)).tolist(), None))
        except BaseException:  # noqa: BLE001  (reported to the parent, which fails the test with it)
            results.put((rank, None, traceback.format_exc()))
            return
        barrier.wait(timeout=TIMEOUT)  # wave done: the parent may now look at the folder


class Team:
    """``n`` spawned processes that load the same checkpoint into the same folder, one wave at a time."""

    def __init__(self, n: int, checkpoint: Path, offload: Path, *, waves: int) -> None:
        ctx = mp.get_context("spawn")
        self.barrier = ctx.Barrier(n + 1)
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_load_and_run, args=(r, str(checkpoint), str(offload), waves,
                                                              self.barrier, self.results)) for r in range(n)]
        for p in self.procs:
            p.start()

    def wave(self) -> list[torch.Tensor]:
        """Release one wave; return each process's output once all have finished it."""
        self.barrier.wait(timeout=TIMEOUT)
        outcomes = [self.results.get(timeout=TIMEOUT) for _ in self.procs]
        errors = [err for _, _, err in outcomes if err]
        assert not errors, errors[0]
        self.barrier.wait(timeout=TIMEOUT)
        return [torch.tensor(out) for _, out, _ in sorted(outcomes, key=lambda o: o[0])]

    def close(self, *, failed: bool = False) -> None:
        """Wait for the processes to exit; after a failure, break the barrier so none waits forever."""
        if failed:
            self.barrier.abort()
        for p in self.procs:
            p.join(timeout=5 if failed else TIMEOUT)
            if p.is_alive():
                p.kill()
                p.join()
        if not failed:
            assert [p.exitcode for p in self.procs] == [0] * len(self.procs)


def assert_consistent(offload: Path, ref: TinyLM) -> None:
    leftovers = sorted(p.name for p in offload.iterdir() if p.name.startswith("."))
    assert not leftovers, f"temporary files left behind: {leftovers}"
    state = ref.state_dict()
    refs = load_offload_index(offload, expected={n: tuple(t.shape) for n, t in state.items()})
    disk_names = {n for n in state if any(n.startswith(k + ".") for k, d in MAP.items() if d == "disk")}
    disk_names -= {n for n in disk_names if n.endswith(".scale")}  # buffers stay in RAM without offload_buffers
    assert set(refs) == disk_names
    weights = WeightsMap(disk=refs)
    for name in disk_names:
        assert torch.equal(weights[name], state[name]), name
    for file in offload.glob("w-*.safetensors"):
        read_header(file)


@pytest.fixture()
def torch_ckpt(tmp_path) -> tuple[TinyLM, Path]:
    ref = reference_tiny_lm(dim=DIM)
    save_state(ref, tmp_path / "ckpt", fmt="torch", shards=3)
    return ref, tmp_path / "ckpt"


def test_processes_sharing_one_offload_folder_all_get_the_reference_outputs(torch_ckpt, tmp_path):
    ref, checkpoint = torch_ckpt
    offload = tmp_path / "offload"
    expected = ref(torch.tensor(IDS)).detach()
    team = Team(N_PROCESSES, checkpoint, offload, waves=2)
    try:
        outputs = team.wave()
        assert all(torch.equal(out, expected) for out in outputs)
        assert_consistent(offload, ref)
        files = {p.name: p.read_bytes() for p in offload.glob("w-*.safetensors")}
        assert len(files) == 3  # one converted file per shard, however many processes wrote it

        # The next wave finds one file truncated and the index gone: all detect it, rewrite it, and agree.
        victim = min(files)
        (offload / victim).write_bytes(files[victim][:-32])
        (offload / "index.json").unlink()
        outputs = team.wave()
        assert all(torch.equal(out, expected) for out in outputs)
        assert_consistent(offload, ref)
        assert {p.name: p.read_bytes() for p in offload.glob("w-*.safetensors")} == files
    except BaseException:
        team.close(failed=True)
        raise
    team.close()
