"""Which files a model needs, fetched through huggingface_hub into the standard cache.

A model is a local folder or a Hub repo id. For a repo the config is downloaded first (which pins
the revision to one commit), the repo is listed once, the first weights name present is picked
(safetensors before torch, an index before a single file), and exactly the index and the shards it
names are downloaded with ``hf_hub_download``: the cache is the one transformers and diffusers use,
so nothing is fetched twice, and other frameworks' weights or unrelated files are never touched.
Offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``) everything comes from the cache
without a single request.

    files = resolve_model_files("org/tiny-llama", revision="main")
    files.weight_files  # (…/snapshots/<sha>/model-00001-of-00002.safetensors, …)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

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
from ..model.sizes import format_size
from ..storage.index import (
    DEFAULT_WEIGHT_NAMES,
    DIFFUSERS_WEIGHT_NAMES,
    INDEX_SUFFIX,
    TRANSFORMERS_WEIGHT_NAMES,
    parse_index,
)
from ..version import __version__

__all__ = [
    "DEFAULT_WEIGHT_NAMES",
    "DIFFUSERS_WEIGHT_NAMES",
    "TRANSFORMERS_WEIGHT_NAMES",
    "ModelFiles",
    "fetch_weight_files",
    "resolve_config",
    "resolve_model_files",
]

logger = logging.getLogger(__name__)

_INDEX = INDEX_SUFFIX
_OTHER_NAMES = Advice("If they are named otherwise, pass {}.", "weight_names", "[...]")
_PIN = Advice("Or pin a revision whose shards are complete: {}.", "revision", "'<commit>'")


@dataclass(frozen=True)
class ModelFiles:
    """The local files of one model: its config and weights, and where they came from.

    ``folder`` holds them (for a repo: the cache snapshot ``…/snapshots/<commit>[/<subfolder>]``);
    ``checkpoint`` is the single weights file or the ``*.index.json``; ``weight_files`` the files
    holding tensors; ``expected_sizes`` maps a weight file to its size on the Hub, when known.
    """

    folder: Path
    config_file: Path
    checkpoint: Path
    weight_files: tuple[Path, ...]
    format: Literal["safetensors", "torch"]
    repo_id: str | None = None
    revision: str | None = None
    commit_hash: str | None = None
    subfolder: str | None = None
    expected_sizes: Mapping[str, int] = field(default_factory=dict, compare=False)

    @property
    def is_sharded(self) -> bool:
        return self.checkpoint.name.endswith(_INDEX)


@dataclass(frozen=True)
class _Repo:
    repo_id: str
    subfolder: str | None
    revision: str | None
    cache_dir: str | None
    token: str | bool | None

    @classmethod
    def of(
        cls, name: str | os.PathLike[str], subfolder: str | None, revision: str | None,
        cache_dir: str | os.PathLike[str] | None, token: str | bool | None,
    ) -> _Repo:
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


def resolve_config(
    name_or_path: str | os.PathLike[str],
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    config_name: str = "config.json",
) -> Path:
    """The local path of a model's config alone (no weights), e.g. to plan a device map first.

    >>> resolve_config("org/tiny-llama")  # doctest: +SKIP
    PosixPath('…/models--org--tiny-llama/snapshots/<sha>/config.json')
    """
    folder = _local_folder(name_or_path, subfolder)
    if folder is not None:
        if not (folder / config_name).is_file():
            raise _missing_local(folder, config_name, name_or_path)
        return folder / config_name
    repo = _Repo.of(name_or_path, subfolder, revision, cache_dir, token)
    why = _offline_reason(local_files_only)
    return Path(_cached_or_raise(repo, config_name, why) if why else _fetch(repo, config_name, revision, probe=True))


def resolve_model_files(
    name_or_path: str | os.PathLike[str],
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    weight_names: Sequence[str] | None = None,
    config_name: str = "config.json",
    fetch_shards: bool = True,
) -> ModelFiles:
    """Find, downloading what is missing, the config and exactly the weight files a model needs.

    ``weight_names`` replaces :data:`DEFAULT_WEIGHT_NAMES` (the first one present wins). With
    ``fetch_shards=False`` the shards an index names are neither downloaded nor checked: ``weight_files``
    says where they will be, and :func:`fetch_weight_files` gets the ones wanted (a pipeline stage's). Raises
    ``ModelNotFoundError``, ``RevisionNotFoundError``, ``ModelFileNotFoundError``,
    ``GatedModelError``, ``OfflineCacheMissError`` (from :mod:`hf_bigmodel.errors`, all ``OSError``)
    or ``InvalidIndexError``, each naming the repo, revision and file.

    >>> files = resolve_model_files("org/tiny-llama", revision="main")  # doctest: +SKIP
    >>> files.format, [p.name for p in files.weight_files]  # doctest: +SKIP
    ('safetensors', ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'])
    """
    names = tuple(weight_names) if weight_names else DEFAULT_WEIGHT_NAMES
    folder = _local_folder(name_or_path, subfolder)
    if folder is not None:
        return _resolve_local(folder, names, config_name, os.fspath(name_or_path), subfolder, fetch_shards)
    repo = _Repo.of(name_or_path, subfolder, revision, cache_dir, token)
    why = _offline_reason(local_files_only)
    if why:
        return _resolve_cached(repo, names, config_name, why, fetch_shards)
    return _resolve_online(repo, names, config_name, fetch_shards)


def fetch_weight_files(
    files: ModelFiles,
    wanted: Iterable[str | os.PathLike[str]],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> None:
    """Download (or find in the cache) the weight files ``wanted`` of ``files`` resolved with ``fetch_shards=False``.

    Files are taken from the commit the config was resolved at. A local folder must already hold them.
    """
    paths = [Path(w) for w in wanted]
    if files.repo_id is None:
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise _missing_local(files.folder, missing[0], str(files.folder))
        return
    repo = _Repo.of(files.repo_id, files.subfolder, files.revision, cache_dir, token)
    why = _offline_reason(local_files_only)
    for path in paths:
        if path.is_file():
            continue
        name = path.relative_to(files.folder).as_posix()
        if why:
            _cached_or_raise(repo, name, why)
        else:
            _fetch(repo, name, files.commit_hash)


def _cap(what: object) -> str:
    text = str(what)
    return text[:1].upper() + text[1:]


def _collect(
    names: Sequence[str],
    *,
    has: Callable[[str], bool],
    get: Callable[[str], Path],
    where: str,
    found: Callable[[], Iterable[str]],
    error: type[HubError],
    ids: dict[str, str | None],
    hint: str,
    advice: Sequence[Advice] = (),
    fetch_shards: bool = True,
) -> tuple[str, Path, tuple[Path, ...]]:
    """Pick the first of ``names`` that ``has``; return ``(name, checkpoint, weight files)``.

    An index is read and every shard it names must be there too; ``get`` returns (downloads) a file.
    ``hint`` (a sentence) and ``advice`` say what to do when files are missing. Without ``fetch_shards``
    the shards are only named: paths next to the index, for :func:`fetch_weight_files`.
    """
    chosen = next((n for n in names if has(n)), None)
    if chosen is None:
        raise error(
            f"{_cap(where)} holds no PyTorch weights: looked for {summarize(names)}; found "
            f"{summarize(found()) or 'nothing'}. {hint}",
            filename=names[0], advice=[*advice, _OTHER_NAMES], **ids,
        )
    checkpoint = get(chosen)
    if not chosen.endswith(_INDEX):
        return chosen, checkpoint, (checkpoint,)
    shards = parse_index(checkpoint).shards
    if not fetch_shards:
        return chosen, checkpoint, tuple(checkpoint.parent / s for s in shards)
    missing = [s for s in shards if not has(s)]
    if missing:
        raise error(
            f"Index {chosen!r} of {where} names {len(shards)} shard(s) and {len(missing)} are missing: "
            f"{summarize(missing)}. {hint}",
            filename=missing[0], advice=[*advice, *([_PIN] if ids.get("revision") else [])], **ids,
        )
    return chosen, checkpoint, tuple(get(s) for s in shards)


# -- local folders ---------------------------------------------------------------------------------
def _local_folder(name_or_path: str | os.PathLike[str], subfolder: str | None) -> Path | None:
    """The folder of a local model, ``None`` for a repo id; raise when it is neither."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if subfolder and not (path / subfolder).is_dir():
            raise ModelFileNotFoundError(
                f"Local model folder {str(path)!r} has no subfolder {subfolder!r} "
                f"(it holds: {summarize(sorted(os.listdir(path))) or 'nothing'}).",
                repo_id=text, filename=subfolder,
            )
        return path / subfolder if subfolder else path
    if path.exists():
        raise ModelNotFoundError(
            f"{text!r} is a file; pass the folder holding the model's config and weights "
            f"({str(path.parent)!r}) or a Hub repo id.", repo_id=text,
        )
    looks_local = not isinstance(name_or_path, str) or text.startswith((".", "/", "~", "\\")) or (
        text.count("/") > 1 or "\\" in text or (os.name == "nt" and ":" in text)
    )
    if not looks_local:
        try:
            validate_repo_id(text)
            return None
        except HFValidationError:
            pass
    raise ModelNotFoundError(
        f"Model {text!r} was not found: there is no local folder {str(path.absolute())!r}"
        f"{'' if looks_local else ', and it is not a valid Hub repo id'}. "
        "Pass an existing folder, or a repo id such as 'org/model'.",
        repo_id=text,
    )


def _missing_local(folder: Path, name: str, asked: str | os.PathLike[str]) -> ModelFileNotFoundError:
    found = summarize(sorted(p.name for p in folder.iterdir())) or "nothing"
    return ModelFileNotFoundError(
        f"{name!r} is missing from local model folder {str(folder)!r} (it holds: {found}).",
        repo_id=os.fspath(asked), filename=name,
    )


def _resolve_local(
    folder: Path, names: tuple[str, ...], config_name: str, asked: str, subfolder: str | None,
    fetch_shards: bool = True,
) -> ModelFiles:
    if not (folder / config_name).is_file():
        raise _missing_local(folder, config_name, asked)
    chosen, checkpoint, weights = _collect(
        names, has=lambda n: (folder / n).is_file(), get=lambda n: folder / n,
        where=f"local model folder {str(folder)!r}", found=lambda: sorted(p.name for p in folder.iterdir()),
        error=ModelFileNotFoundError, ids={"repo_id": asked}, hint="Copy them there.", fetch_shards=fetch_shards,
    )
    config = folder / config_name
    return ModelFiles(folder, config, checkpoint, weights, _format(chosen), subfolder=subfolder or None)


# -- the Hub, online -------------------------------------------------------------------------------
def _resolve_online(repo: _Repo, names: tuple[str, ...], config_name: str, fetch_shards: bool = True) -> ModelFiles:
    config = Path(_fetch(repo, config_name, repo.revision, probe=True))
    snapshot, commit = _snapshot_of(config, repo.path(config_name))
    try:
        listing = _list_files(repo, commit)
    except Exception as err:  # noqa: BLE001 - any HTTP client's transport errors; the rest is re-raised
        if not _is_connection_error(err):
            raise (_translate(err, repo, None) or err) from None
        logger.warning("Could not list the files of %s (%s); resolving from the cache instead.", repo, err)
        return _resolve_cached(repo, names, config_name, "the Hub could not be reached", fetch_shards)
    prefix, sizes = repo.path(""), dict[str, int]()

    def get(name: str) -> Path:  # pinned to the config's commit: one consistent snapshot
        path = Path(_fetch(repo, name, commit))
        if (size := listing.get(repo.path(name))) is not None:
            sizes[str(path)] = size
        return path

    chosen, checkpoint, weights = _collect(
        names, has=lambda n: repo.path(n) in listing, get=get, where=str(repo),
        found=lambda: sorted(n[len(prefix) :] for n in listing if n.startswith(prefix)),
        error=ModelFileNotFoundError, ids=repo.ids, hint="Ask the repo's owner to add them.",
        fetch_shards=fetch_shards,
    )
    expected = {str(w): sizes[str(w)] for w in weights if str(w) in sizes}
    logger.info("%s: %s, %d file(s), %s", repo, chosen, len(weights), format_size(sum(expected.values())))
    folder = snapshot / repo.subfolder if repo.subfolder else snapshot
    return ModelFiles(
        folder, config, checkpoint, weights, _format(chosen),
        repo.repo_id, repo.revision, commit, repo.subfolder, expected,
    )


def _fetch(repo: _Repo, name: str, revision: str | None, *, probe: bool = False) -> str:
    """``hf_hub_download`` one file (with the library's progress bar), translating the Hub's errors.

    ``probe`` (the first file of a model, its config): when it is not in the cache, ask for it once
    without retries first, so an unreachable Hub fails at once where ``hf_hub_download`` would retry
    for ~25 s. Later files come after the Hub has answered.
    """
    from huggingface_hub import hf_hub_download

    if probe and _cached(repo, name, revision) is None:
        _probe(repo, name, revision)
    try:
        return hf_hub_download(
            repo.repo_id, name, subfolder=repo.subfolder, revision=revision, cache_dir=repo.cache_dir,
            token=repo.token, library_name="hf_bigmodel", library_version=__version__,
        )
    except Exception as err:
        translated = _translate(err, repo, repo.path(name))
        if translated is None:
            raise
        raise translated from err


def _probe(repo: _Repo, name: str, revision: str | None) -> None:
    """Ask the Hub for ``name``'s metadata once (no retries); raise at once when it cannot be reached.

    Other answers (found, not found, gated...) are left to ``hf_hub_download``, which asks again.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo.repo_id, name, subfolder=repo.subfolder, revision=revision)
    logger.info("Asking %s for %r of %s", constants.ENDPOINT, repo.path(name), repo)
    try:
        get_hf_file_metadata(url, token=repo.token, library_name="hf_bigmodel", library_version=__version__)
    except Exception as err:  # noqa: BLE001 - only transport failures are ours to report here
        if not _is_unreachable(err):
            return
        cause = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OfflineCacheMissError(
            f"Could not reach {constants.ENDPOINT} to fetch {repo.path(name)!r} of {repo} ({cause}), and it is "
            f"not in the cache {_cache_dir(repo)!r}. Check the network or proxy settings (HF_ENDPOINT, "
            "HTTPS_PROXY), or download the model once while online.",
            filename=repo.path(name), **repo.ids,
        ) from err


def _list_files(repo: _Repo, revision: str) -> dict[str, int | None]:
    """Every file of the repo at ``revision`` with its size (one request)."""
    from huggingface_hub import HfApi

    # A fresh HfApi reads the endpoint now; huggingface_hub's module-level instance froze it at import.
    info = HfApi().model_info(repo.repo_id, revision=revision, token=repo.token, files_metadata=True)
    return {s.rfilename: (s.lfs.size if s.lfs else s.size) for s in info.siblings or []}


def _snapshot_of(file: Path, name_in_repo: str) -> tuple[Path, str]:
    """``(…/snapshots/<commit>, commit)`` for a file that ``hf_hub_download`` returned."""
    snapshot = file.parents[len(PurePosixPath(name_in_repo).parts) - 1]
    return snapshot, snapshot.name


def _translate(err: Exception, repo: _Repo, filename: str | None) -> HubError | None:
    """huggingface_hub's exception -> ours, with what was asked and what to do; ``None`` if unknown."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    ids = {**repo.ids, "filename": filename}
    hub = constants.ENDPOINT
    if isinstance(err, hf.GatedRepoError):  # before RepositoryNotFoundError, its base class
        told = "the token given has no access" if isinstance(repo.token, str) else "no token was sent"
        return GatedModelError(
            f"{_cap(repo)} is gated and {told}. Accept its terms at {hub}/{repo.repo_id}.", **ids,
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
            listing = _list_files(repo, repo.rev)
            found = summarize(sorted(n[len(prefix) :] for n in listing if n.startswith(prefix)))
        except Exception as listing_error:  # noqa: BLE001 - the listing is only a courtesy in this message
            logger.debug("Could not list %s: %s", repo, listing_error)
        held = f" (the repo holds: {found})." if found else "."
        return ModelFileNotFoundError(f"{filename!r} is missing from {repo}{held}", **ids)
    if isinstance(err, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        cause = str(err).splitlines()[0] if str(err) else ""
        return OfflineCacheMissError(
            f"Could not reach {hub} to fetch {filename!r} of {repo}, and it is not in the cache "
            f"{_cache_dir(repo)!r}. Check the network or proxy settings, or download the model once while "
            f"online. ({type(err).__name__}: {cause})", **ids,
        )
    return None


def _is_connection_error(err: Exception) -> bool:
    """Network trouble: any HTTP client's transport errors, 5xx answers, offline mode."""
    from huggingface_hub import errors as hf

    if isinstance(err, (hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError)) or _is_unreachable(err):
        return True
    return isinstance(err, hf.HfHubHTTPError) and getattr(err.response, "status_code", 0) >= 500


def _is_unreachable(err: Exception) -> bool:
    """No answer at all: refused, no route, no DNS, timed out (any HTTP client's transport errors)."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    return any(c.__name__ in ("TransportError", "TimeoutException") for c in type(err).__mro__)


# -- the Hub, from the cache only ------------------------------------------------------------------
_LOCAL_ONLY = "local_files_only=True"
_OFFLINE_ENV = "offline mode (HF_HUB_OFFLINE=1)"


def _offline_reason(local_files_only: bool) -> str:
    """Why the Hub must not be asked ("" if it may). The env var is read now, not at import."""
    from huggingface_hub import constants

    if local_files_only:
        return _LOCAL_ONLY
    offline = flag("HF_HUB_OFFLINE", default=False, strict=False) or constants.is_offline_mode()
    return _OFFLINE_ENV if offline else ""


def _cache_dir(repo: _Repo) -> str:
    from huggingface_hub import constants

    return repo.cache_dir if repo.cache_dir is not None else constants.HF_HUB_CACHE


def _cached(repo: _Repo, name: str, revision: str | None = None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo.repo_id, repo.path(name), cache_dir=repo.cache_dir,
                                   revision=revision or repo.rev)
    return found if isinstance(found, str) else None


def _go_online(why: str) -> tuple[str, list[Advice]]:
    """Why the Hub was not asked and how to let it be: a sentence and the advice naming the argument."""
    if why == _LOCAL_ONLY:
        return "", [Advice("{} forbids asking the Hub: load the model once without it, or pass a folder holding "
                           "the model.", "local_files_only", "True")]
    if why == _OFFLINE_ENV:
        return f"{_cap(why)} forbids asking the Hub: unset it to load the model once online, or pass a folder.", []
    return f"{_cap(why)}: check the network or proxy settings, or pass a folder holding the model.", []


def _cached_or_raise(repo: _Repo, name: str, why: str) -> str:
    found = _cached(repo, name)
    if found is None:
        sentence, advice = _go_online(why)
        raise OfflineCacheMissError(
            f"{_cap(repo)}: {repo.path(name)!r} is not in the cache {_cache_dir(repo)!r}. {sentence}".strip(),
            filename=repo.path(name), advice=advice, **repo.ids,
        )
    return found


def _resolve_cached(
    repo: _Repo, names: tuple[str, ...], config_name: str, why: str, fetch_shards: bool = True
) -> ModelFiles:
    config = Path(_cached_or_raise(repo, config_name, why))
    snapshot, commit = _snapshot_of(config, repo.path(config_name))
    folder = snapshot / repo.subfolder if repo.subfolder else snapshot
    sentence, advice = _go_online(why)
    chosen, checkpoint, weights = _collect(
        names, has=lambda n: _cached(repo, n) is not None, get=lambda n: Path(_cached_or_raise(repo, n, why)),
        where=f"the cached copy of {repo} (in {_cache_dir(repo)!r})",
        found=lambda: sorted(p.name for p in folder.iterdir()), error=OfflineCacheMissError, ids=repo.ids,
        hint=sentence, advice=advice, fetch_shards=fetch_shards,
    )
    return ModelFiles(
        folder, config, checkpoint, weights, _format(chosen),
        repo.repo_id, repo.revision, commit, repo.subfolder,
    )


# -- indexes and formats ---------------------------------------------------------------------------
def _format(name: str) -> Literal["safetensors", "torch"]:
    return "safetensors" if name.removesuffix(_INDEX).endswith(".safetensors") else "torch"
