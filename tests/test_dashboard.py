"""The dashboard (/dashboard) and the API docs (/docs) in a real browser: Debian's headless Chromium
driven by Playwright, against a real server with both secrets set (conftest's secured_server).

Chromium comes from apt (`.ci/run` installs it): Playwright's own browser download cannot be reached from these
machines. In CI (CI set) a missing browser fails these tests; elsewhere it skips them, saying how to install it.
Each test writes a screenshot of what it looked at under its tmp dir.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from .conftest import ADMIN_TOKEN, API_KEY, EXPERTS, bearer

CHROMIUM = os.environ.get("XLORA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        message = f"no Chromium at {CHROMIUM}: apt-get install -y chromium (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        browser.close()


class Page:
    """A fresh browser page that records console errors, uncaught exceptions and requests leaving 127.0.0.1."""

    def __init__(self, browser, base_url: str) -> None:
        self.base_url = base_url
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        self.outside: list[str] = []
        self.context.route("**/*", self._only_loopback)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"{m.text} @ {m.location}"))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def _only_loopback(self, route) -> None:
        url = route.request.url
        if urlparse(url).hostname not in ("127.0.0.1", "localhost") and not url.startswith(("data:", "blob:")):
            self.outside.append(url)
            route.abort()
        else:
            route.continue_()

    def open_dashboard(self, with_key: bool = True):
        page = self.page
        page.goto(self.base_url + "/dashboard")
        key_form = page.get_by_test_id("key-form")
        key_form.wait_for(state="visible")  # the server has XLORA_API_KEY set: the page asks for it
        if with_key:
            page.locator("#key-input").fill(API_KEY)
            key_form.locator("button").click()
            key_form.wait_for(state="hidden")
        return page

    def close(self) -> None:
        self.context.close()


@pytest.fixture()
def web(browser, secured_server):
    page = Page(browser, secured_server.url)
    yield page
    page.close()


@pytest.fixture()
def api(secured_server):
    with httpx.Client(base_url=secured_server.url, timeout=60) as c:
        yield c


def ask(api: httpx.Client, text: str, chat: bool = True, max_new_tokens: int = 12) -> dict:
    body = {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
    body["max_new_tokens"] = max_new_tokens
    r = api.post("/generate", json=body, headers=bearer(API_KEY))
    assert r.status_code == 200, r.text
    return r.json()


def layer_means(detail: dict) -> list[list[float]]:
    """Per token (prompt, then completion), the mix over layers, as the page computes it."""
    n_prompt, total = detail["prompt_tokens"], detail["prompt_tokens"] + detail["completion_tokens"]
    rows = []
    for t in range(total):
        position = t if t < n_prompt else t - 1
        layers = detail["scalings"][position]
        rows.append([sum(layer[e] for layer in layers) / len(layers) for e in range(len(EXPERTS))])
    return rows


def layer_mean(detail: dict, layer: int, expert: int) -> float:
    return sum(p[layer][expert] for p in detail["scalings"]) / len(detail["scalings"])


def layer_grid(detail: dict) -> tuple[list[int], list[str]]:
    """The decoder layers and the modules (first seen first) of a request's LoRA layers, from their names."""
    parsed = [re.match(r"^(.*?)(\d+)\.(.+)$", name) for name in detail["layer_names"]]
    blocks = sorted({int(m.group(2)) for m in parsed})
    modules = list(dict.fromkeys(m.group(3).split(".")[-1] for m in parsed))
    return blocks, modules


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def test_requests_appear_live_and_tokens_show_their_experts(web, api, tmp_path):
    page = web.open_dashboard()
    page.get_by_test_id("request-list").wait_for(state="attached")
    # A plain prompt first (the tokenizer puts its special <s> before it), then two chats.
    ids = [ask(api, "Compute: 47 + 38", chat=False)["id"]]
    ids += [ask(api, text)["id"] for text in ["Sort: pear, apple, fig", "JSON: [a, 1]"]]
    # Live: they appear without a reload, newest first.
    for rid in ids:
        page.locator(f'[data-testid="request"][data-id="{rid}"]').wait_for()
    listed = page.get_by_test_id("request").evaluate_all("items => items.map(i => i.dataset.id)")
    assert listed.index(ids[2]) < listed.index(ids[1]) < listed.index(ids[0])
    first = page.locator(f'[data-testid="request"][data-id="{ids[0]}"]')
    assert first.get_by_test_id("prompt-share").locator("i").count() == len(EXPERTS)
    assert first.get_by_test_id("completion-share").locator("i").count() == len(EXPERTS)
    page.get_by_test_id("requests-view").screenshot(path=tmp_path / "requests.png")

    # One request, numbers only: the client key gets no token text, and the page says why.
    rid = ids[0]
    first.click()
    detail = api.get(f"/scalings/{rid}", headers=bearer(API_KEY)).json()
    n_tokens = detail["prompt_tokens"] + detail["completion_tokens"]
    tokens = page.get_by_test_id("tokens").get_by_test_id("token")
    page.wait_for_function(
        "([rid, n]) => document.querySelector('#detail-title').textContent === rid"
        " && document.querySelectorAll('[data-testid=tokens] [data-testid=token]').length === n",
        arg=[rid, n_tokens],
    )
    note = page.get_by_test_id("text-note")
    assert note.is_visible() and "admin" in note.inner_text()
    assert tokens.first.inner_text().strip().startswith("#0")

    # With the admin token: each token's text, coloured by the expert that the JSON says dominates it.
    page.get_by_test_id("admin-token").fill(ADMIN_TOKEN)
    page.get_by_test_id("admin-token").dispatch_event("change")
    with_text = api.get(f"/scalings/{rid}", params={"include_text": "true"}, headers=bearer(ADMIN_TOKEN)).json()
    page.wait_for_function("() => !document.querySelector('[data-testid=text-note]').checkVisibility()")
    shown = tokens.evaluate_all(
        "nodes => nodes.map(n => ({text: n.querySelector('.tok-text').textContent, expert: Number(n.dataset.expert),"
        " special: n.classList.contains('special'), part: n.dataset.part}))"
    )
    expected = layer_means(with_text)
    assert len(shown) == n_tokens == len(expected)
    for t, (token, mix) in enumerate(zip(shown, expected, strict=True)):
        assert token["expert"] == argmax(mix), (t, token, mix)
        assert token["text"] == with_text["tokens"][t]["text"].replace("\n", "↵") or token["text"] == "∅"
        assert token["special"] == with_text["tokens"][t]["special"]
        assert token["part"] == ("prompt" if t < with_text["prompt_tokens"] else "completion")
    assert shown[0]["special"] and shown[0]["text"] == "<s>"  # the tokenizer's BOS, dimmed
    # The prompt/completion boundary sits right after the last prompt token.
    boundary_at = page.get_by_test_id("tokens").evaluate(
        "box => [...box.children].findIndex(c => c.dataset.testid === 'boundary')"
    )
    assert boundary_at == with_text["prompt_tokens"]
    # Hover shows the exact weights.
    tokens.nth(3).hover()
    tooltip = page.locator("#tooltip")
    tooltip.wait_for(state="visible")
    assert f"{expected[3][0]:.4f}" in tooltip.inner_text()
    page.get_by_test_id("tokens").screenshot(path=tmp_path / "tokens.png")

    # Heatmaps: experts x tokens and layers x experts, with the values of the JSON.
    grid = page.get_by_test_id("heatmap-token-expert-cells")
    assert grid.get_attribute("data-rows") == str(len(EXPERTS)) and grid.get_attribute("data-cols") == str(n_tokens)
    assert grid.locator("rect").count() == len(EXPERTS) * n_tokens
    cell = grid.locator('rect[data-row="1"][data-col="5"]')
    assert float(cell.get_attribute("data-value")) == pytest.approx(expected[5][1], abs=1e-5)
    # Layer x expert: decoder layers as rows, each module's experts as columns (the tiny world: 2 decoder
    # layers, 6 modules targeted by some expert), every LoRA layer's mean over positions in its cell.
    layers = page.get_by_test_id("heatmap-layer-expert-cells")
    blocks, modules = layer_grid(with_text)
    assert (len(blocks), len(modules)) == (2, 6) and len(blocks) * len(modules) == with_text["n_layers"]
    assert layers.get_attribute("data-rows") == str(len(blocks))
    assert layers.get_attribute("data-cols") == str(len(modules) * len(EXPERTS))
    assert layers.locator("rect").count() == with_text["n_layers"] * len(EXPERTS)
    cell = layers.locator('rect[data-row="1"][data-col="13"]')  # decoder layer 1, module 4 (gate_proj), sorting
    layer = int(cell.get_attribute("data-layer"))
    assert with_text["layer_names"][layer].endswith("layers.1.mlp.gate_proj")
    assert float(cell.get_attribute("data-value")) == pytest.approx(layer_mean(with_text, layer, 1), abs=1e-5)
    assert page.get_by_test_id("heatmap-token-expert").get_by_test_id("colour-scale").is_visible()
    with page.expect_download() as download:
        page.locator('[data-export="svg"][data-target="heatmap-layer-expert"]').click()
    assert download.value.suggested_filename.endswith(".svg")
    assert "<svg" in Path(download.value.path()).read_text()
    with page.expect_download() as download:
        page.locator('[data-export="png"][data-target="heatmap-token-expert"]').click()
    assert Path(download.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page.get_by_test_id("detail-view").screenshot(path=tmp_path / "detail.png")

    # Usage: each expert's share over the log, answers apart from prompts.
    log = api.get("/scalings", headers=bearer(API_KEY)).json()["entries"]
    answer_share = [sum(e["completion_mean_scalings"][i] for e in log) / len(log) for i in range(len(EXPERTS))]
    page.wait_for_function(
        "n => document.querySelectorAll('[data-testid=request]').length === n", arg=len(log)
    )
    cells = page.get_by_test_id("usage-answer-share").all_inner_texts()
    assert cells == [f"{100 * s:.1f}%" for s in answer_share]
    page.get_by_test_id("usage-view").screenshot(path=tmp_path / "usage.png")
    page.screenshot(path=tmp_path / "dashboard.png", full_page=True)
    assert web.errors == [] and web.outside == []


def test_frozen_and_constrained_requests_are_marked(web, api, tmp_path):
    body = {"prompt": "freeze", "max_new_tokens": 8, "routing": {"freeze_after": 2}}
    r = api.post("/generate", json=body, headers=bearer(API_KEY))
    assert r.status_code == 200, r.text
    done = r.json()
    n_prompt, n_out = done["usage"]["prompt_tokens"], done["usage"]["completion_tokens"]
    assert n_out > 3, "the answer must go past the freeze point"
    page = web.open_dashboard()
    page.locator(f'[data-testid="request"][data-id="{done["id"]}"]').click()
    page.wait_for_function(
        "([rid, n]) => document.querySelector('#detail-title').textContent === rid"
        " && document.querySelectorAll('[data-testid=tokens] [data-testid=token]').length === n",
        arg=[done["id"], n_prompt + n_out],
    )
    frozen = page.get_by_test_id("tokens").get_by_test_id("token").evaluate_all(
        "nodes => nodes.map(n => n.classList.contains('frozen'))"
    )
    # Answer tokens 0..2 were routed (token 2 by the freeze position itself); tokens 3.. reused its scalings.
    assert frozen == [False] * (n_prompt + 3) + [True] * (n_out - 3)
    # A constrained request says so in the list.
    body = {"prompt": "digits", "max_new_tokens": 4, "constraint": {"regex": "[a-c]{2,4}"}}
    r = api.post("/generate", json=body, headers=bearer(API_KEY))
    assert r.status_code == 200, r.text
    item = page.locator(f'[data-testid="request"][data-id="{r.json()["id"]}"]')
    item.get_by_test_id("constraint").filter(has_text="constrained: regex").wait_for()
    page.get_by_test_id("tokens").screenshot(path=tmp_path / "frozen.png")
    assert web.errors == [] and web.outside == []


def test_routing_form_changes_the_routing_and_shows_a_refusal(web, api, tmp_path):
    admin = bearer(ADMIN_TOKEN)
    before = {k: v for k, v in api.get("/routing", headers=bearer(API_KEY)).json().items() if k != "version"}
    page = web.open_dashboard()
    form = page.get_by_test_id("routing-form")
    page.get_by_test_id("routing-now").filter(has_text="weight").wait_for()
    message = page.get_by_test_id("routing-message")
    try:
        # A wrong admin token: refused, the page says why, nothing changes.
        page.get_by_test_id("admin-token").fill("not-the-admin-token")
        form.locator("#routing-top-k").select_option("1")
        form.locator("button[type=submit]").click()
        page.wait_for_function("() => document.querySelector('[data-testid=routing-message]').textContent !== ''")
        assert "Refused" in message.inner_text() and "admin token" in message.inner_text()
        assert api.get("/routing", headers=bearer(API_KEY)).json().items() >= before.items()
        page.get_by_test_id("usage-view").screenshot(path=tmp_path / "routing-refused.png")

        page.get_by_test_id("admin-token").fill(ADMIN_TOKEN)
        form.locator("#routing-weight").fill("0.5")
        form.locator("#routing-freeze").fill("3")
        form.locator("button[type=submit]").click()
        page.wait_for_function("() => document.querySelector('[data-testid=routing-message]').textContent"
                               ".startsWith('Routing changed')")  # fmt: skip
        after = api.get("/routing", headers=bearer(API_KEY)).json()
        assert after["top_k"] == 1 and after["global_scaling_weight"] == 0.5 and after["freeze_after"] == 3
        page.get_by_test_id("routing-now").filter(has_text="top-1 · weight 0.5").wait_for()
        page.get_by_test_id("routing-now").filter(has_text="freeze after 3").wait_for()
        page.get_by_test_id("usage-view").screenshot(path=tmp_path / "routing-changed.png")
    finally:
        api.patch("/routing", json=before, headers=admin).raise_for_status()
    # The console errors allowed: Chromium's reports of the 401s the wrong admin token got (the PATCH, and the
    # token texts the page asked for with it).
    unexpected = [e for e in web.errors if not ("401" in e and ("/routing" in e or "include_text=true" in e))]
    assert unexpected == [] and web.outside == []


def test_try_it_streams_the_answer_and_colours_it(web, api, tmp_path):
    page = web.open_dashboard()
    # Each token as it is added to the page: is it coloured already (its expert known), or only later?
    page.evaluate("""() => {
      window.tokensAsAdded = [];
      new MutationObserver((records) => records.forEach((r) => r.addedNodes.forEach((n) => {
        if (n.dataset && n.dataset.testid === 'token') window.tokensAsAdded.push(n.dataset.expert ?? null);
      }))).observe(document.querySelector('[data-testid=try-output]'), { childList: true });
    }""")
    page.get_by_test_id("try-prompt").fill("Sort: kiwi, fig, apple")
    page.locator("#try-max").fill("10")
    page.get_by_test_id("try-form").locator("button").click()
    message = page.get_by_test_id("try-message")
    page.wait_for_function("() => document.querySelector('[data-testid=try-message]').classList.contains('ok')")
    rid = page.get_by_test_id("try-output").get_attribute("data-request-id")
    detail = api.get(f"/scalings/{rid}", headers=bearer(API_KEY)).json()
    assert detail["completion_tokens"] >= 1 and str(detail["completion_tokens"]) in message.inner_text()
    answer = page.get_by_test_id("try-output").get_by_test_id("token")
    experts = answer.evaluate_all("nodes => nodes.map(n => Number(n.dataset.expert))")
    assert experts == [argmax(row) for row in layer_means(detail)[detail["prompt_tokens"]:]]
    # Coloured as they streamed: every token came in with its expert, and no node was replaced at the end.
    as_added = page.evaluate("() => window.tokensAsAdded")
    assert as_added == [str(e) for e in experts], as_added
    # The request it made is in the list, and selected.
    page.locator(f'[data-testid="request"][data-id="{rid}"].selected').wait_for()
    page.get_by_test_id("try-view").screenshot(path=tmp_path / "try-it.png")
    assert web.errors == [] and web.outside == []


def test_docs_render_without_the_internet(web, tmp_path):
    page = web.page
    page.goto(web.base_url + "/docs")
    page.locator(".opblock").first.wait_for()  # Swagger UI rendered the operations from /openapi.json
    assert page.locator(".opblock").count() >= 10
    page.get_by_text("/v1/chat/completions").first.wait_for()
    page.screenshot(path=tmp_path / "docs.png")
    assert web.outside == [], "the docs asked for files from outside"
    assert web.errors == []


# -----------------------------------------------------------------------------
# the layer x expert heatmap on one 1440x900 screen


SCREEN = {"width": 1440, "height": 900}


def save_deep_world(root: Path) -> dict:
    """A tiny random Llama 32 decoder layers deep, three experts on all 7 linear modules: 224 LoRA layers,
    the shape of a 7B model's layer x expert view (Mistral-7B has 32 layers)."""
    import torch
    from transformers import LlamaForCausalLM

    from .tiny_world import SERVER_MODEL_VOCAB, save_char_tokenizer, save_checkpoint, save_expert, tiny_llama_config

    torch.manual_seed(0)
    config = tiny_llama_config(SERVER_MODEL_VOCAB)
    config.num_hidden_layers = 32
    LlamaForCausalLM(config).save_pretrained(root / "base")
    save_char_tokenizer(root / "base")
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    experts = {name: str(save_expert(root / "base", root / name, seed=i, r=2, lora_alpha=4, target_modules=modules))
               for i, name in enumerate(EXPERTS)}  # fmt: skip
    checkpoint = save_checkpoint(root / "base", experts, root / "checkpoint")
    return {"base": str(root / "base"), "checkpoint": str(checkpoint)}


@pytest.fixture(scope="module")
def deep_server(start_server, tmp_path_factory):
    from .conftest import server_config

    return start_server(server_config(save_deep_world(tmp_path_factory.mktemp("deep"))))


def open_plain_dashboard(browser, url: str) -> tuple:
    context = browser.new_context(viewport=SCREEN)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS * 3)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    page.goto(url + "/dashboard")
    return context, page, errors


@pytest.mark.parametrize("which", ["embedded default", "32 layers x 7 modules"])
def test_the_layer_heatmap_fits_one_screen(which, browser, request, tmp_path):
    if which == "embedded default":
        from .test_server_default import _missing

        if _missing():
            pytest.skip(_missing())
        server, shape = request.getfixturevalue("default_server"), (30, 7)
    else:
        server, shape = request.getfixturevalue("deep_server"), (32, 7)
    body = {"prompt": "Compute: 2 + 3", "max_new_tokens": 2}
    rid = httpx.post(server.url + "/generate", json=body, timeout=300).json()["id"]
    detail = httpx.get(f"{server.url}/scalings/{rid}").json()
    assert layer_grid(detail)[0] == list(range(shape[0])) and len(layer_grid(detail)[1]) == shape[1]

    context, page, errors = open_plain_dashboard(browser, server.url)
    try:
        page.locator(f'[data-testid="request"][data-id="{rid}"]').click()
        cells = page.get_by_test_id("heatmap-layer-expert-cells")
        page.wait_for_function(
            "rid => document.querySelector('#detail-title').textContent === rid"
            " && document.querySelector('[data-testid=heatmap-layer-expert-cells]')", arg=rid)
        n_experts = len(detail["adapter_names"])
        assert cells.get_attribute("data-rows") == str(shape[0])
        assert cells.get_attribute("data-cols") == str(shape[1] * n_experts)
        assert cells.locator("rect").count() == detail["n_layers"] * n_experts
        figure = page.get_by_test_id("heatmap-layer-expert").locator("svg")
        box = figure.bounding_box()
        assert box["width"] <= SCREEN["width"] and box["height"] <= SCREEN["height"], box
        # Exact values on hover, as the JSON has them.
        last = cells.locator("rect").last
        layer, expert = int(last.get_attribute("data-layer")), int(last.get_attribute("data-expert"))
        value = layer_mean(detail, layer, expert)
        assert float(last.get_attribute("data-value")) == pytest.approx(value, abs=1e-5)
        assert last.locator("title").text_content().endswith(f"{value:.4f}")
        assert detail["layer_names"][layer] in last.locator("title").text_content()
        figure.screenshot(path=tmp_path / "layer-heatmap.png")
        assert errors == []
    finally:
        context.close()
