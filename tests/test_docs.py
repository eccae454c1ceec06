"""The docs site builds with `mkdocs build --strict` (a broken link or anchor, a page missing from the nav, a
docstring that mkdocstrings cannot read: each fails), offline, and its reference pages are rendered from the
code: every config key of server/settings.py, the Python API from docstrings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from server.settings import Settings

from .conftest import REPO


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_the_configuration_reference_lists_every_key_of_the_settings(site):
    html = (site / "configuration.html").read_text()
    for section, field in Settings.model_fields.items():
        if field.exclude:
            continue
        model = field.annotation
        if typing.get_origin(model) is list:  # a list of entries (models:): rendered as `models[].key`
            (model,) = typing.get_args(model)
            section = f"{section}[]"
        for key, info in model.model_fields.items():
            assert f"<code>{section}.{key}</code>" in html, f"{section}.{key} missing from the reference"
            assert info.description, f"{section}.{key} has no description (a docstring under the field)"
    assert "<!-- settings-reference -->" not in html


def test_the_api_reference_is_rendered_from_docstrings(site):
    html = (site / "reference.html").read_text()
    for name in ("xlora_core.model.XLoraModel.generate", "xlora_core.classifier.Routing",
                 "xlora_core.engine.DecodeBatch"):  # fmt: skip
        assert f'id="{name}"' in html, name


def test_the_site_fetches_nothing_from_the_internet(site):
    for page in site.glob("*.html"):
        html = page.read_text()
        remote = re.findall(r'<(?:script|link|img)[^>]+(?:src|href)="(https?://[^"]+)"', html)
        assert not remote, f"{page.name} loads {remote}"
