"""Where the server's models come from: 'default', local paths and Hugging Face Hub ids, turned into local folders.

`resolve_model_source` is the one resolver for every model the server is given. At start-up it runs in the
loader thread, before /ready, for the config's model.base, xlora.checkpoint and xlora.adapters.* (the config is
the admin's, so its Hub ids are always fetched). Runtime loading (an admin endpoint that loads a model by
reference) must call it with `allow_hub=settings.server.allow_hub_downloads`, so that a client cannot make the
server fetch an arbitrary repository unless the operator has allowed it.

Hub ids go through xlora_core.hub: huggingface_hub's cache (HF_HOME), HF_TOKEN and HF_HUB_OFFLINE; each
failure is one line naming the key and the id.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.settings import Settings
from xlora_core.hub import BASE_MODEL_FILES, HubError, hub_folder, is_local, parse_hub_id


@dataclass(frozen=True)
class ModelSources:
    """The config's models as local folders (or 'default', or a .gguf file)."""

    base: str
    checkpoint: str | None
    adapters: dict[str, str] | None


def resolve_model_source(
    value: str, key: str, *, revision: str | None = None, base_model: bool = False, allow_hub: bool = True
) -> str:
    """'default' or a local path as it is; a Hub id (`org/name[/folder][@revision]`) fetched into huggingface_hub's
    cache, its folder there returned. `key` names the setting or request field in every error (HubError, one
    line); `base_model` fetches only what loading a base model reads; `allow_hub=False` refuses Hub ids."""
    if value == "default":
        if revision is not None:
            raise HubError(f"{key}: revision {revision!r} applies to a Hugging Face Hub id, not to {value!r}")
        return "default"
    if not allow_hub and not is_local(value) and _is_hub_id(value, key):
        raise HubError(
            f"{key}: {value!r} is a Hugging Face Hub id, and this server does not fetch models at run time "
            "(set server.allow_hub_downloads: true to allow it)"
        )
    return str(hub_folder(value, key, revision, BASE_MODEL_FILES if base_model else None))


def resolve_sources(settings: Settings) -> ModelSources:
    """The config's base, checkpoint and experts as local folders, Hub ids fetched first (HubError naming the
    file, the key and the id)."""
    where = f"{settings.source}: " if settings.source is not None else ""
    base = resolve_model_source(settings.base_spec(), where + "model.base", revision=settings.model.revision,
                                base_model=True)  # fmt: skip
    checkpoint = settings.checkpoint_dir()
    if checkpoint is not None:
        checkpoint = resolve_model_source(checkpoint, where + "xlora.checkpoint", revision=settings.xlora.revision)
    adapters = settings.adapter_dirs()
    if adapters is not None:
        adapters = {name: resolve_model_source(folder, f"{where}xlora.adapters.{name}")
                    for name, folder in adapters.items()}  # fmt: skip
    return ModelSources(base, checkpoint, adapters)


def _is_hub_id(value: str, key: str) -> bool:
    try:
        return parse_hub_id(value) is not None
    except ValueError as exc:
        raise HubError(f"{key}: {exc}") from None
