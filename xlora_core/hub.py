"""Hugging Face Hub ids wherever a model folder is accepted, resolved the way transformers resolves them.

An existing local path wins. Otherwise `org/name` is a Hub repository, optionally followed by a folder inside
it (`lamm-mit/x-lora/adapter_1`) and `@revision` (a branch, tag or commit), fetched by huggingface_hub's
`snapshot_download` into its standard cache (HF_HOME, HF_HUB_CACHE), honouring HF_TOKEN and HF_HUB_OFFLINE; a
repository downloaded before is read from that cache. Downloads show huggingface_hub's progress bars.

Every failure is one `HubError` line naming what asked for the model (a config key, an argument) and the id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, is_offline_mode, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import validate_repo_id

log = logging.getLogger("xlora_core.hub")

# What a base model's folder needs: config, weights, tokenizer, chat template. A repository often holds the same
# weights several times over (safetensors, pytorch .bin, onnx, gguf); transformers reads the safetensors.
BASE_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
# Older repositories have pytorch weights only: fetched when a repository has no safetensors.
BASE_MODEL_PYTORCH_FILES = ["*.json", "pytorch_model*.bin", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


class HubError(OSError):
    """A Hub id that cannot be used; the one-line message names who asked for it (key or argument) and the id."""


@dataclass(frozen=True)
class HubId:
    """`repo_id[/subfolder][@revision]`: a repository on the Hub, a folder in it and the revision to take."""

    repo_id: str
    subfolder: str = ""
    revision: str | None = None

    def __str__(self) -> str:
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return f"{self.repo_id}{sub}" + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(value: str, revision: str | None = None) -> HubId | None:
    """The Hub id `value` spells, or None if it cannot be one (a path like /x, ./x, ~/x, x.gguf, or a bare name).

    `revision` (a `revision:` key) is the same as `@revision`; giving both is an error.
    """
    path, at, rev = str(value).partition("@")
    parts = path.split("/")
    if len(parts) < 2 or any(not p for p in parts) or parts[-1].endswith(".gguf"):
        return None
    repo_id = "/".join(parts[:2])
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    if any(p in (".", "..") for p in parts[2:]):
        return None
    if at and not rev:
        raise ValueError(f"{value!r}: nothing after '@' (expected org/name@revision)")
    if at and revision is not None and rev != revision:
        raise ValueError(f"{value!r}: the revision is given twice ('@{rev}' and revision {revision!r})")
    return HubId(repo_id, "/".join(parts[2:]), rev or revision)


def is_local(value: str | Path) -> bool:
    return Path(value).expanduser().exists()


def hub_folder(value: str | Path, what: str, revision: str | None = None, files: list[str] | None = None) -> Path:
    """A local path as it is (whether or not it exists: the caller says what is missing); a Hub id's folder in the
    cache, downloaded first if need be. `files`: only these patterns (BASE_MODEL_FILES: what loading a base
    model reads); None: the whole repository or folder."""
    if is_local(value):
        if revision is not None:
            raise HubError(f"{what}: {str(value)!r} is a local path; a revision ({revision!r}) applies to Hub ids only")
        return Path(value).expanduser()
    try:
        hub_id = parse_hub_id(str(value), revision)
    except ValueError as exc:
        raise HubError(f"{what}: {exc}") from None
    if hub_id is None:
        if revision is not None:
            raise HubError(f"{what}: {str(value)!r} is not a Hub id (org/name); revision {revision!r} needs one")
        return Path(value).expanduser()
    return download(hub_id, what, files)


def download(hub_id: HubId, what: str, files: list[str] | None = None) -> Path:
    """The folder of `hub_id` in huggingface_hub's cache, fetching what is missing (or new on its branch)."""
    sub = f"{hub_id.subfolder}/" if hub_id.subfolder else ""
    log.info("%s: %s: from the Hugging Face Hub or its cache (%s%s)", what, hub_id, constants.HF_HUB_CACHE,
             "; HF_HUB_OFFLINE: the cache only" if is_offline_mode() else "")  # fmt: skip
    snapshot = _snapshot(hub_id, what, [sub + p for p in files] if files else ([sub + "*"] if sub else None))
    folder = snapshot / hub_id.subfolder if hub_id.subfolder else snapshot
    if files is BASE_MODEL_FILES and folder.is_dir() and not any(folder.glob("*.safetensors")):
        _snapshot(hub_id, what, [sub + p for p in BASE_MODEL_PYTORCH_FILES])  # into the same snapshot folder
    if not folder.is_dir():
        raise HubError(f"{what}: {hub_id}: the repository {hub_id.repo_id} has no folder {hub_id.subfolder!r}")
    log.info("%s: %s: %s", what, hub_id, folder)
    return folder


def _snapshot(hub_id: HubId, what: str, patterns: list[str] | None) -> Path:
    try:
        return Path(snapshot_download(hub_id.repo_id, revision=hub_id.revision, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line naming the key and the id
        raise HubError(f"{what}: {hub_id}: {hub_error_reason(exc, hub_id)}") from exc


def hub_error_reason(exc: BaseException, hub_id: HubId) -> str:
    """Why huggingface_hub could not give this repository, in one line (its own messages span several)."""
    repo, rev = hub_id.repo_id, hub_id.revision or "main"
    if isinstance(exc, GatedRepoError):
        return (f"{repo} is a gated repository on the Hugging Face Hub: accept its conditions on "
                f"https://huggingface.co/{repo} and set HF_TOKEN to a token of that account")  # fmt: skip
    if isinstance(exc, RepositoryNotFoundError):
        return ("not a local path, and no repository of that name on the Hugging Face Hub (if it is private, "
                "set HF_TOKEN)")  # fmt: skip
    if isinstance(exc, RevisionNotFoundError):
        return f"the Hugging Face Hub repository {repo} has no revision {rev!r}"
    if isinstance(exc, IncompleteSnapshotError):
        return (f"revision {rev!r} is only partly in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub "
                "cannot be reached to finish it")  # fmt: skip
    if isinstance(exc, LocalEntryNotFoundError):
        cache = constants.HF_HUB_CACHE
        why = ("HF_HUB_OFFLINE is set (fill the cache first: xlora-serve --download-only on a machine online)"
               if is_offline_mode() else "the Hugging Face Hub cannot be reached")  # fmt: skip
        if (Path(cache) / repo_folder_name(repo_id=repo, repo_type="model")).is_dir():
            return f"revision {rev!r} of {repo} is not in the Hugging Face cache ({cache}), and {why}"
        return f"not a local path, and not in the Hugging Face cache ({cache}), and {why}"
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        if status == 401:
            return "the Hugging Face Hub refused the token (HTTP 401): set HF_TOKEN to a valid one, or unset it"
        return f"the Hugging Face Hub answered HTTP {status} ({_first_line(exc)})"
    return f"download failed: {type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]
