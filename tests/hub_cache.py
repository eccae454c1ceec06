"""A Hugging Face Hub cache laid out as huggingface_hub lays it, from local folders (the tests cannot reach the Hub).

    <HF_HOME>/hub/models--<org>--<name>/refs/<revision>            the commit the revision points at
    <HF_HOME>/hub/models--<org>--<name>/snapshots/<commit>/<file>  each file (here a symlink to the real one)

A process that reads it gets HF_HOME=<that folder> and HF_HUB_OFFLINE=1 in its environment (`offline_env`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def add_repo(hf_home: Path, repo_id: str, folder: str | Path, revision: str = "main") -> Path:
    """Put `folder`'s files into the cache as revision `revision` of `repo_id`; the snapshot folder is returned."""
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for source in sorted(Path(folder).rglob("*")):
        if source.is_file():
            target = snapshot / source.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source.resolve())
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def offline_env(hf_home: Path) -> dict[str, str]:
    """The environment a process reads the cache with: no network, this cache (HF_HUB_CACHE too, since a machine's
    own setting of it would win over HF_HOME)."""
    return {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_OFFLINE": "1"}
