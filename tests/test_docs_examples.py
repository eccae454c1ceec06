"""Every bash and python example of README.md and docs/*.md runs against the embedded default, and prints
what the page says it prints (tests/docs_examples.py: how blocks are collected, run and checked). A block
that cannot run here is marked in its page, right above it: `<!-- docs-test: skip (why) -->`."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from .conftest import REPO
from .docs_examples import check_config, collect, run_bash, run_python
from .test_server_default import needs_default

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_every_example_runs_or_says_why_not():
    """A skip marker gives its reason, and every page with examples is collected."""
    blocks = [block for page in PAGES for block in collect(page)]
    assert any(block.path.name == "README.md" and not block.skip for block in blocks)
    for block in blocks:
        assert block.skip is None or len(block.skip) > 5, f"{block.where}: say why it cannot run"


@pytest.fixture()
def routing_restored(default_server):
    """The examples change the shared server's routing; put it back as it was for the tests after."""
    before = httpx.get(default_server.url + "/routing").json()
    yield
    now = httpx.get(default_server.url + "/routing").json()
    fields = {k: v for k, v in before.items() if k != "version"}
    if {k: v for k, v in now.items() if k != "version"} != fields:
        httpx.patch(default_server.url + "/routing", json=fields).raise_for_status()


@needs_default
@pytest.mark.parametrize("page", [p for p in PAGES if any(not b.skip and b.language != "yaml" for b in collect(p))],
                         ids=lambda p: p.name)  # fmt: skip
def test_the_examples_of_the_page_run_and_print_what_it_shows(page: Path, default_server, routing_restored,
                                                             monkeypatch):  # fmt: skip
    monkeypatch.chdir(REPO)  # the examples name checkpoints/default and configs/ from the project folder
    namespace: dict = {"__name__": "__docs__"}
    problems = []
    for block in collect(page):
        if block.skip:
            continue
        if block.language == "bash":
            problems += run_bash(block, default_server.url, REPO)
        elif block.language == "yaml":
            continue  # test_the_config_examples_are_valid_configs
        else:
            problems += run_python(block, namespace, default_server.url)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.language == "yaml" for b in collect(p))],
                         ids=lambda p: p.name)  # fmt: skip
def test_the_config_examples_are_valid_configs(page: Path):
    problems = [problem for block in collect(page) if block.language == "yaml" and not block.skip
                for problem in check_config(block)]  # fmt: skip
    assert not problems, "\n".join(problems)
