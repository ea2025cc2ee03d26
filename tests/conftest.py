"""Shared fixtures: every test is hermetic (temp HF caches, no real token, no real Hub), and ``hub``
starts a local Hub-compatible server with huggingface_hub pointed at it."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so tests can `import hub_server, tiny_models`

from hub_server import HubServer, point_hub_client_at

_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_ID_TOKEN", "HF_OIDC_RESOURCE")
_UNSET_VARS = (
    *_TOKEN_VARS,
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_ENDPOINT",
    "HUGGINGFACE_HUB_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
    "TRANSFORMERS_CACHE",
    "PYTORCH_TRANSFORMERS_CACHE",
    "PYTORCH_PRETRAINED_BERT_CACHE",
    "DIFFUSERS_CACHE",
    "HF_HUB_ETAG_TIMEOUT",
    "HF_HUB_DOWNLOAD_TIMEOUT",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    "XDG_CACHE_HOME",
)


def _closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens: a stray Hub request fails at once, offline."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def _nowhere_url() -> str:
    return _closed_port_url()


@pytest.fixture(autouse=True)
def hermetic_hf(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, _nowhere_url: str
) -> Iterator[Path]:
    """Point every Hugging Face cache and token path at a fresh temp dir; drop the machine's token.

    huggingface_hub reads its environment once at import (``huggingface_hub.constants``), and
    transformers/diffusers copy some values at their own import, so the captured copies are
    patched as well. The endpoint points at a closed local port until a test asks for ``hub``.
    Returns the temp ``HF_HOME``.
    """
    from huggingface_hub import close_session, constants, hf_api

    home = tmp_path_factory.mktemp("hf_home")
    for name in _UNSET_VARS:
        monkeypatch.delenv(name, raising=False)
    paths = {
        "HF_HOME": home,
        "HF_HUB_CACHE": home / "hub",
        "HF_ASSETS_CACHE": home / "assets",
        "HF_XET_CACHE": home / "xet",
        "HF_TOKEN_PATH": home / "token",
        "HF_MODULES_CACHE": home / "modules",
    }
    for name, value in paths.items():
        monkeypatch.setenv(name, str(value))
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, str(value))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_UPDATE_CHECK", "1")
    extra = {
        "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "default_cache_path": str(home / "hub"),
        "default_assets_cache_path": str(home / "assets"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
    }
    for name, value in extra.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    # Copies taken at import time by other modules (patched only where already imported).
    copies = {
        "huggingface_hub.utils._cache_manager": {"HF_HUB_CACHE": str(home / "hub")},
        "huggingface_hub.utils._cache_assets": {"HF_ASSETS_CACHE": str(home / "assets")},
        "transformers.utils.hub": {"HF_MODULES_CACHE": str(home / "modules")},
        "transformers.dynamic_module_utils": {"HF_MODULES_CACHE": str(home / "modules")},
        "diffusers.utils.constants": {"HF_HOME": str(home), "HF_MODULES_CACHE": str(home / "modules")},
        "diffusers.utils.hub_utils": {"HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_TELEMETRY": True},
        "diffusers.loaders.lora_base": {"HF_HUB_OFFLINE": False},
        "diffusers.models.attention_dispatch": {"HF_HUB_OFFLINE": False},
    }
    for module_name, attrs in copies.items():
        module = sys.modules.get(module_name)
        for name, value in attrs.items():
            if module is not None and hasattr(module, name):
                monkeypatch.setattr(module, name, value)
    # huggingface_hub fetches its agent-harness registry once per process, from whichever endpoint is
    # set then: an extra GET in the log of whichever test comes first. Every test sees none instead.
    detect = sys.modules.get("huggingface_hub.utils._detect_agent")
    if detect is not None and hasattr(detect, "_registry") and hasattr(detect, "_EMPTY_REGISTRY"):
        monkeypatch.setattr(detect, "_registry", detect._EMPTY_REGISTRY)
    # No real Hub: stray requests go to a closed local port and fail fast.
    monkeypatch.setattr(constants, "ENDPOINT", _nowhere_url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", _nowhere_url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(hf_api.api, "endpoint", _nowhere_url)
    yield home
    close_session()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A running local Hub (see ``hub_server.HubServer``) that huggingface_hub talks to for this test."""
    from huggingface_hub import close_session

    with HubServer() as server:
        point_hub_client_at(monkeypatch, server.url)
        yield server
        close_session()  # drop keep-alive connections before the server goes away


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models on one intra-op thread (for a module: ``pytestmark = pytest.mark.usefixtures("one_thread")``).

    On a busy 2-core machine a second thread makes each small op wait for the other core: a 16x16 linear
    took 2 ms with two threads and 70 us with one. Compared runs share the setting, so results stay exact.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
