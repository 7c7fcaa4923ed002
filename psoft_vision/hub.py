"""The Hugging Face hub: names that are a local path or a hub repository id, and uploads.

A name that exists on disk is local; else ``org/name`` is a hub repository, fetched with huggingface_hub (its cache,
``HF_HUB_CACHE`` / ``HF_HOME``, ``HF_HUB_OFFLINE`` and login apply). Whatever goes wrong on the way is a
:class:`~psoft_vision.errors.HubError` that names what was tried. huggingface_hub is imported here only, when a hub
name is used: the package itself needs torch and safetensors alone (``pip install psoft-vision[hub]`` adds it).
"""

import contextlib
import os
import re
from pathlib import Path

from .errors import HubAccessError, HubError, HubNotFoundError, HubOfflineError, MissingExtraError

#: The adapter file a repository (or an output folder) holds unless ``weight_name`` says otherwise.
DEFAULT_WEIGHT_NAME = "adapter.safetensors"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")


def huggingface_hub():
    """The huggingface_hub module, or a :class:`MissingExtraError` naming the extra to install."""
    try:
        import huggingface_hub
    except ImportError as error:
        raise MissingExtraError("hub repository ids need huggingface_hub: pip install 'psoft-vision[hub]' (or pass "
                                "a local path).") from error
    return huggingface_hub


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` is a hub repository id (``org/name``) rather than a local path: it does not exist on disk
    and has the form of a repository id."""
    text = os.fspath(name)
    return not Path(text).exists() and bool(_REPO_ID.fullmatch(text)) and ".." not in text and "--" not in text


def _described(repo_id: str, revision: str | None, filename: str | None) -> str:
    where = f"{filename!r} of " if filename else ""
    return f"{where}hub repository {repo_id!r} (revision {revision or 'main'!r})"


def _offline() -> bool:
    return bool(huggingface_hub().constants.HF_HUB_OFFLINE)


def _chain(error: BaseException) -> list[BaseException]:
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _translated(error: BaseException, repo_id: str, revision: str | None, filename: str | None,
                cache_dir: str | os.PathLike | None) -> HubError | None:
    """The named error for a huggingface_hub failure anywhere in ``error``'s chain (diffusers and timm wrap them)."""
    errors = huggingface_hub().errors
    what = _described(repo_id, revision, filename)
    for cause in _chain(error):
        if isinstance(cause, errors.GatedRepoError):
            return HubAccessError(f"{what} is gated: accept its conditions on its hub page while logged in, then "
                                  "log in here too (`hf auth login`, or the HF_TOKEN environment variable).")
        if isinstance(cause, errors.RepositoryNotFoundError):
            return HubAccessError(f"{what} does not exist, or is private and this machine is not logged in with "
                                  "access to it (`hf auth login`, or HF_TOKEN); check the name.")
        if isinstance(cause, errors.RevisionNotFoundError):
            return HubNotFoundError(f"{what}: the repository has no revision {revision!r}; pass a branch, tag or "
                                    "commit it has.")
        if isinstance(cause, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
            why = "HF_HUB_OFFLINE=1 is set" if _offline() else "the hub could not be reached"
            cache = cache_dir or huggingface_hub().constants.HF_HUB_CACHE
            return HubOfflineError(f"{what} is not in the local cache ({cache}) "
                                   f"and {why}; connect and unset HF_HUB_OFFLINE to download it once, or pass a "
                                   "local path.")
        if isinstance(cause, errors.EntryNotFoundError):
            return HubNotFoundError(f"{what}: the repository has no such file; pass the weight_name of a file it "
                                    "holds.")
    return None


def _upload_translated(error: BaseException, repo_id: str) -> HubError | None:
    errors = huggingface_hub().errors
    for cause in _chain(error):
        if isinstance(cause, errors.OfflineModeIsEnabled):
            return HubOfflineError(f"cannot upload to hub repository {repo_id!r}: HF_HUB_OFFLINE=1 is set; unset it "
                                   "on a machine with network.")
        if isinstance(cause, errors.HfHubHTTPError):
            status = getattr(cause.response, "status_code", "?")
            return HubAccessError(f"the hub refused the upload to {repo_id!r} (HTTP {status}: "
                                  f"{cause.server_message or cause}); log in with a token that may write there "
                                  "(`hf auth login`, HF_TOKEN or --hub_token), or choose a repository of yours.")
    return None


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None, filename: str | None = None,
               cache_dir: str | os.PathLike | None = None, upload: bool = False):
    """Turn huggingface_hub's failures inside the block (also those diffusers or timm wrap) into named HubErrors:
    of a download, or with ``upload`` of an upload."""
    try:
        yield
    except HubError:
        raise
    except Exception as error:
        named = _upload_translated(error, repo_id) if upload else \
            _translated(error, repo_id, revision, filename, cache_dir)
        if named is None:
            raise
        raise named from error


def hub_file(repo_id: str, filename: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
             token: str | None = None) -> Path:
    """The local path of ``filename`` in hub repository ``repo_id``, from the cache or downloaded into it."""
    hub = huggingface_hub()
    with hub_errors(repo_id, revision, filename, cache_dir):
        return Path(hub.hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, token=token))


def adapter_file(path_or_repo: str | os.PathLike, weight_name: str | None = None, revision: str | None = None,
                 cache_dir: str | os.PathLike | None = None, token: str | None = None) -> Path:
    """The local adapter file that ``path_or_repo`` names: a file; a folder (or hub repository) and its
    ``weight_name`` (default ``adapter.safetensors``, what the trainers write). Anything else (a missing path, a
    folder of another tool) is returned as it is, for the loader to say what it is."""
    if not is_hub_id(path_or_repo):
        path = Path(path_or_repo)
        inside = path / (weight_name or DEFAULT_WEIGHT_NAME)
        return inside if path.is_dir() and (weight_name or inside.is_file()) else path
    try:
        return hub_file(os.fspath(path_or_repo), weight_name or DEFAULT_WEIGHT_NAME, revision, cache_dir, token)
    except HubError as error:  # a mistyped local path has the form of a repository id too: say both were tried
        raise type(error)(f"{os.fspath(path_or_repo)!r} is not on disk; as a hub id: {error}") from error.__cause__


def timm_hub_id(model_name: str) -> str | None:
    """The hub repository a timm model name's weights come from: ``hf-hub:org/name``'s, or the one its
    pretrained_cfg names (``vit_base_patch16_224.augreg_in21k``: ``timm/vit_base_patch16_224.augreg_in21k``); None
    for weights from elsewhere (a local file, a URL) and for names timm does not know."""
    import timm

    source, name = timm.models.parse_model_name(model_name)
    if source == "hf-hub":
        return name.split("@")[0]
    try:
        return timm.models.get_pretrained_cfg(name).hf_hub_id
    except (AttributeError, RuntimeError):  # no such name, or no pretrained configs: create_model will say so
        return None


# ------------------------------------------------------------------------------------------------------- uploads
def create_repo(repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Create model repository ``repo_id`` (kept if it exists); returns its full id (``org/name``: a bare name
    goes under the token's user)."""
    hub = huggingface_hub()
    with hub_errors(repo_id, upload=True):
        return hub.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True).repo_id


def upload_folder(folder: str | os.PathLike, repo_id: str, token: str | None = None,
                  commit_message: str | None = None, ignore_patterns: list[str] | None = None) -> str:
    """Upload ``folder`` as it is to the root of model repository ``repo_id`` in one commit; returns its URL."""
    hub = huggingface_hub()
    with hub_errors(repo_id, upload=True):
        info = hub.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", token=token,
                                 commit_message=commit_message or "Upload with psoft_vision",
                                 ignore_patterns=ignore_patterns)
    return info.commit_url


def __getattr__(name: str):
    """``push_to_hub``, moved to :mod:`psoft_vision.publish` (it saves adapter files and model cards, which read
    hub names from here): still importable from here, with a DeprecationWarning."""
    from .moved import moved_name

    return moved_name(__name__, name, None, {"push_to_hub": "publish"})
