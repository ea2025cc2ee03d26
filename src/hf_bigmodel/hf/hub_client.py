"""Talking to the Hub and its cache: one repo's identity, downloads, listings, and errors made ours.

:mod:`.hub` decides which files a model needs; this module fetches one file (``hf_hub_download``, the
cache transformers and diffusers share), lists a repo, finds a file in the cache without a request,
and turns huggingface_hub's exceptions into :mod:`hf_bigmodel.errors` ones that say what was asked
and what to do. huggingface_hub is imported inside the functions, when a repo is actually used.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..env import flag
from ..errors import (
    Advice,
    GatedModelError,
    HubError,
    ModelFileNotFoundError,
    ModelNotFoundError,
    OfflineCacheMissError,
    RevisionNotFoundError,
    summarize,
)
from ..version import __version__

__all__ = [
    "LOCAL_ONLY",
    "OFFLINE_ENV",
    "Repo",
    "cache_dir_of",
    "cached",
    "cached_or_raise",
    "capitalized",
    "fetch",
    "go_online",
    "is_connection_error",
    "list_files",
    "offline_reason",
    "snapshot_of",
    "translate",
]

logger = logging.getLogger(__name__)


def capitalized(what: object) -> str:
    text = str(what)
    return text[:1].upper() + text[1:]


@dataclass(frozen=True)
class Repo:
    repo_id: str
    subfolder: str | None
    revision: str | None
    cache_dir: str | None
    token: str | bool | None

    @classmethod
    def of(
        cls, name: str | os.PathLike[str], subfolder: str | None, revision: str | None,
        cache_dir: str | os.PathLike[str] | None, token: str | bool | None,
    ) -> Repo:
        cache = os.fspath(cache_dir) if cache_dir is not None else None
        return cls(os.fspath(name), subfolder or None, revision, cache, token)

    def path(self, name: str) -> str:
        return f"{self.subfolder}/{name}" if self.subfolder else name

    @property
    def rev(self) -> str:
        return self.revision or "main"

    @property
    def ids(self) -> dict[str, Any]:  # keyword arguments of HubError: repo_id, revision
        return {"repo_id": self.repo_id, "revision": self.rev}

    def __str__(self) -> str:
        where = f" (subfolder {self.subfolder!r})" if self.subfolder else ""
        return f"model {self.repo_id!r}{where} at revision {self.rev!r}"


def fetch(repo: Repo, name: str, revision: str | None, *, probe: bool = False) -> str:
    """``hf_hub_download`` one file (with the library's progress bar), translating the Hub's errors.

    ``probe`` (the first file of a model, its config): when it is not in the cache, ask for it once
    without retries first, so an unreachable Hub fails at once where ``hf_hub_download`` would retry
    for ~25 s. Later files come after the Hub has answered.
    """
    from huggingface_hub import hf_hub_download

    if probe and cached(repo, name, revision) is None:
        ask_once(repo, name, revision)
    try:
        return hf_hub_download(
            repo.repo_id, name, subfolder=repo.subfolder, revision=revision, cache_dir=repo.cache_dir,
            token=repo.token, library_name="hf_bigmodel", library_version=__version__,
        )
    except Exception as err:
        translated = translate(err, repo, repo.path(name))
        if translated is None:
            raise
        raise translated from err


def ask_once(repo: Repo, name: str, revision: str | None) -> None:
    """Ask the Hub for ``name``'s metadata once (no retries); raise at once when it cannot be reached.

    Other answers (found, not found, gated...) are left to ``hf_hub_download``, which asks again.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo.repo_id, name, subfolder=repo.subfolder, revision=revision)
    logger.info("Asking %s for %r of %s", constants.ENDPOINT, repo.path(name), repo)
    try:
        get_hf_file_metadata(url, token=repo.token, library_name="hf_bigmodel", library_version=__version__)
    except Exception as err:  # noqa: BLE001 - only transport failures are ours to report here
        if not is_unreachable(err):
            return
        cause = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OfflineCacheMissError(
            f"Could not reach {constants.ENDPOINT} to fetch {repo.path(name)!r} of {repo} ({cause}), and it is "
            f"not in the cache {cache_dir_of(repo)!r}. Check the network or proxy settings (HF_ENDPOINT, "
            "HTTPS_PROXY), or download the model once while online.",
            filename=repo.path(name), **repo.ids,
        ) from err


def list_files(repo: Repo, revision: str) -> dict[str, int | None]:
    """Every file of the repo at ``revision`` with its size (one request)."""
    from huggingface_hub import HfApi

    # A fresh HfApi reads the endpoint now; huggingface_hub's module-level instance froze it at import.
    info = HfApi().model_info(repo.repo_id, revision=revision, token=repo.token, files_metadata=True)
    return {s.rfilename: (s.lfs.size if s.lfs else s.size) for s in info.siblings or []}


def snapshot_of(file: Path, name_in_repo: str) -> tuple[Path, str]:
    """``(…/snapshots/<commit>, commit)`` for a file that ``hf_hub_download`` returned."""
    snapshot = file.parents[len(PurePosixPath(name_in_repo).parts) - 1]
    return snapshot, snapshot.name


def translate(err: Exception, repo: Repo, filename: str | None) -> HubError | None:
    """huggingface_hub's exception -> ours, with what was asked and what to do; ``None`` if unknown."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    ids = {**repo.ids, "filename": filename}
    hub = constants.ENDPOINT
    if isinstance(err, hf.GatedRepoError):  # before RepositoryNotFoundError, its base class
        told = "the token given has no access" if isinstance(repo.token, str) else "no token was sent"
        return GatedModelError(
            f"{capitalized(repo)} is gated and {told}. Accept its terms at {hub}/{repo.repo_id}.", **ids,
            advice=[Advice("Then pass {} (a token of the account that accepted) or run `hf auth login`.",
                           "token", "'hf_...'")],
        )
    if isinstance(err, hf.RepositoryNotFoundError):
        return ModelNotFoundError(
            f"Model {repo.repo_id!r} was not found: it is not a local folder and {hub} has no repository of "
            "that name. Check the spelling.", **ids,
            advice=[Advice("For a private repository pass {} or run `hf auth login`.", "token", "'hf_...'")],
        )
    if isinstance(err, hf.RevisionNotFoundError):
        return RevisionNotFoundError(
            f"Revision {repo.rev!r} of model {repo.repo_id!r} does not exist on {hub}.", **ids,
            advice=[Advice("Pass an existing branch, tag or commit hash, e.g. {}.", "revision", "'main'")],
        )
    if isinstance(err, hf.RemoteEntryNotFoundError):
        found, prefix = "", repo.path("")
        try:
            listing = list_files(repo, repo.rev)
            found = summarize(sorted(n[len(prefix) :] for n in listing if n.startswith(prefix)))
        except Exception as listing_error:  # noqa: BLE001 - the listing is only a courtesy in this message
            logger.debug("Could not list %s: %s", repo, listing_error)
        held = f" (the repo holds: {found})." if found else "."
        return ModelFileNotFoundError(f"{filename!r} is missing from {repo}{held}", **ids)
    if isinstance(err, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        cause = str(err).splitlines()[0] if str(err) else ""
        return OfflineCacheMissError(
            f"Could not reach {hub} to fetch {filename!r} of {repo}, and it is not in the cache "
            f"{cache_dir_of(repo)!r}. Check the network or proxy settings, or download the model once while "
            f"online. ({type(err).__name__}: {cause})", **ids,
        )
    return None


def is_connection_error(err: Exception) -> bool:
    """Network trouble: any HTTP client's transport errors, 5xx answers, offline mode."""
    from huggingface_hub import errors as hf

    if isinstance(err, (hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError)) or is_unreachable(err):
        return True
    return isinstance(err, hf.HfHubHTTPError) and getattr(err.response, "status_code", 0) >= 500


def is_unreachable(err: Exception) -> bool:
    """No answer at all: refused, no route, no DNS, timed out (any HTTP client's transport errors)."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    return any(c.__name__ in ("TransportError", "TimeoutException") for c in type(err).__mro__)


# -- the cache only ------------------------------------------------------------------------------
LOCAL_ONLY = "local_files_only=True"
OFFLINE_ENV = "offline mode (HF_HUB_OFFLINE=1)"


def offline_reason(local_files_only: bool) -> str:
    """Why the Hub must not be asked ("" if it may). The env var is read now, not at import."""
    from huggingface_hub import constants

    if local_files_only:
        return LOCAL_ONLY
    offline = flag("HF_HUB_OFFLINE", default=False, strict=False) or constants.is_offline_mode()
    return OFFLINE_ENV if offline else ""


def cache_dir_of(repo: Repo) -> str:
    from huggingface_hub import constants

    return repo.cache_dir if repo.cache_dir is not None else constants.HF_HUB_CACHE


def cached(repo: Repo, name: str, revision: str | None = None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo.repo_id, repo.path(name), cache_dir=repo.cache_dir,
                                   revision=revision or repo.rev)
    return found if isinstance(found, str) else None


def go_online(why: str) -> tuple[str, list[Advice]]:
    """Why the Hub was not asked and how to let it be: a sentence and the advice naming the argument."""
    if why == LOCAL_ONLY:
        return "", [Advice("{} forbids asking the Hub: load the model once without it, or pass a folder holding "
                           "the model.", "local_files_only", "True")]
    if why == OFFLINE_ENV:
        return (f"{capitalized(why)} forbids asking the Hub: unset it to load the model once online, or pass a "
                "folder."), []
    return f"{capitalized(why)}: check the network or proxy settings, or pass a folder holding the model.", []


def cached_or_raise(repo: Repo, name: str, why: str) -> str:
    found = cached(repo, name)
    if found is None:
        sentence, advice = go_online(why)
        raise OfflineCacheMissError(
            f"{capitalized(repo)}: {repo.path(name)!r} is not in the cache {cache_dir_of(repo)!r}. {sentence}".strip(),
            filename=repo.path(name), advice=advice, **repo.ids,
        )
    return found
