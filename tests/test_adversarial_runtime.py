"""Adversarial cases on the acting side: a dispatched model computes with the weights planned, or raises.

Weight files that change under a running model, hooks removed and attached again, dispatch and
``disk_offload`` failing half way: each case ends either in exactly the reference output or in a clear
error that leaves the model as it was. Cases that could crash (a file truncated under a reader) run in a
child process with a memory cap and a timeout (``adversarial.run_isolated``).
"""

from __future__ import annotations

import torch
from adversarial import run_isolated
from core_models import TinyLM, reference_tiny_lm, save_state

from hf_bigmodel import init_empty_weights

IDS = torch.tensor([[1, 5, 9, 3], [7, 2, 0, 4]])


def empty_lm() -> TinyLM:
    with init_empty_weights():
        return TinyLM()


# --- checkpoint files read in place that change under a dispatched model ----------------------------------


def test_a_checkpoint_read_in_place_that_changes_after_dispatch_is_an_error_at_the_next_forward(tmp_path):
    """Re-saved (offsets move), overwritten in place (same size) or truncated, with and without prefetching:
    the next forward raises FileChangedError naming the file, never computes with other bytes. (A re-save
    writes a new file: a reader that still holds the old one open reads exactly the planned bytes.)"""
    ref = reference_tiny_lm()
    save_state(ref, tmp_path / "ckpt")
    result = run_isolated(f"""
        import os, shutil, torch
        from safetensors.torch import save_file
        from core_models import TinyLM, reference_tiny_lm
        from hf_bigmodel import FileChangedError, init_empty_weights, load_checkpoint_and_dispatch

        ids = torch.tensor({IDS.tolist()})
        ref = reference_tiny_lm()
        expected = ref(ids)
        state = {{k: v for k, v in ref.state_dict().items() if k != "head.weight"}}

        def resave(file):
            save_file(state, file, metadata={{"note": "x" * 40}})  # same tensors, every offset moved

        def overwrite(file):
            size = os.path.getsize(file)
            with open(file, "r+b") as f:  # same inode, same size, other bytes after the header
                f.seek(size // 2)
                f.write(os.urandom(size - size // 2))

        def truncate(file):
            with open(file, "r+b") as f:
                f.truncate(os.path.getsize(file) // 2)

        out = {{}}
        for change in (resave, overwrite, truncate):
            for prefetch in (None, 0):  # the prefetcher's reader keeps the file open; without it, opened per read
                device_map = {{"embed": "cpu", "blocks": "disk", "norm": "disk", "head": "cpu"}}
                folder = {str(tmp_path)!r} + f"/run-{{change.__name__}}-{{prefetch}}"
                shutil.copytree({str(tmp_path / "ckpt")!r}, folder)
                file = folder + "/model.safetensors"
                with init_empty_weights():
                    model = TinyLM()
                model = load_checkpoint_and_dispatch(model, folder, device_map=device_map, prefetch=prefetch)
                first = torch.equal(model(ids), expected)  # files opened and read once: the readers hold them
                change(file)
                try:  # a file replaced by a new one (a new inode) may still be read as planned, from the old one
                    outcome = "as planned" if torch.equal(model(ids), expected) else "other weights"
                except FileChangedError as err:
                    outcome = "named" if file in str(err) and "changed after it was planned" in str(err) else str(err)
                except Exception as err:
                    outcome = f"{{type(err).__name__}}: {{err}}"
                out[f"{{change.__name__}} prefetch={{prefetch}}"] = [first, outcome]
        report(out)
    """)
    assert all(first and outcome in ("named", "as planned") for first, outcome in result.values()), result
    assert all(outcome == "named" for case, (_, outcome) in result.items() if not case.startswith("resave")), result
    assert len(result) == 6
