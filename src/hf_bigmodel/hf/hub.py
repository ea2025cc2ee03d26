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
from pathlib import Path
from typing import Literal

from ..errors import (
    Advice,
    HubError,
    ModelFileNotFoundError,
    ModelNotFoundError,
    OfflineCacheMissError,
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
from .hub_client import (
    Repo,
    cache_dir_of,
    cached,
    cached_or_raise,
    capitalized,
    fetch,
    go_online,
    is_connection_error,
    list_files,
    offline_reason,
    snapshot_of,
    translate,
)

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
    repo = Repo.of(name_or_path, subfolder, revision, cache_dir, token)
    why = offline_reason(local_files_only)
    return Path(cached_or_raise(repo, config_name, why) if why else fetch(repo, config_name, revision, probe=True))


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
    repo = Repo.of(name_or_path, subfolder, revision, cache_dir, token)
    why = offline_reason(local_files_only)
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
    repo = Repo.of(files.repo_id, files.subfolder, files.revision, cache_dir, token)
    why = offline_reason(local_files_only)
    for path in paths:
        if path.is_file():
            continue
        name = path.relative_to(files.folder).as_posix()
        if why:
            cached_or_raise(repo, name, why)
        else:
            fetch(repo, name, files.commit_hash)


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
            f"{capitalized(where)} holds no PyTorch weights: looked for {summarize(names)}; found "
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
def _resolve_online(repo: Repo, names: tuple[str, ...], config_name: str, fetch_shards: bool = True) -> ModelFiles:
    config = Path(fetch(repo, config_name, repo.revision, probe=True))
    snapshot, commit = snapshot_of(config, repo.path(config_name))
    try:
        listing = list_files(repo, commit)
    except Exception as err:  # noqa: BLE001 - any HTTP client's transport errors; the rest is re-raised
        if not is_connection_error(err):
            raise (translate(err, repo, None) or err) from None
        logger.warning("Could not list the files of %s (%s); resolving from the cache instead.", repo, err)
        return _resolve_cached(repo, names, config_name, "the Hub could not be reached", fetch_shards)
    prefix, sizes = repo.path(""), dict[str, int]()

    def get(name: str) -> Path:  # pinned to the config's commit: one consistent snapshot
        path = Path(fetch(repo, name, commit))
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


def _resolve_cached(
    repo: Repo, names: tuple[str, ...], config_name: str, why: str, fetch_shards: bool = True
) -> ModelFiles:
    config = Path(cached_or_raise(repo, config_name, why))
    snapshot, commit = snapshot_of(config, repo.path(config_name))
    folder = snapshot / repo.subfolder if repo.subfolder else snapshot
    sentence, advice = go_online(why)
    chosen, checkpoint, weights = _collect(
        names, has=lambda n: cached(repo, n) is not None, get=lambda n: Path(cached_or_raise(repo, n, why)),
        where=f"the cached copy of {repo} (in {cache_dir_of(repo)!r})",
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
