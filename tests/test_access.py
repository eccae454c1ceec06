"""The access policy, route by route: every route of the app (enumerated from the app itself), called with no
credentials, a wrong key, the client key and the admin token, gets exactly what its level allows; no prompt text
reaches a caller below admin; no secret appears in any answer or in the log; /docs needs nothing from outside.

One real server with both secrets set (conftest's secured_server).
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
from fastapi.routing import iter_route_contexts

from server.access import ADMIN, CLIENT, PUBLIC, check_routes, route_levels
from server.app import create_app
from server.settings import AuthSettings, load_settings

from .conftest import ADMIN_TOKEN, API_KEY, bearer, server_config, write_config

WRONG = "wrong-key-5b0e"
CALLERS = {"nobody": {}, "wrong key": bearer(WRONG), "client key": bearer(API_KEY), "admin token": bearer(ADMIN_TOKEN)}
MARKER = "PLOVERSECRET"  # in one client's prompt; must never reach another caller below admin

# How to call each route with a valid request: body and query; path parameters are filled in per test run.
# A route of the app missing here fails test_every_route_answers_by_its_level (add it, with its level).
CALLS = {
    ("POST", "/generate"): {"json": {"prompt": "hi", "max_new_tokens": 2}},
    ("POST", "/v1/completions"): {"json": {"model": "tiny-xlora", "prompt": "hi", "max_tokens": 2}},
    ("POST", "/v1/chat/completions"): {
        "json": {"model": "tiny-xlora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    },
    ("PATCH", "/routing"): {"json": {}},  # changes nothing
    ("POST", "/models"): {"json": {"name": "access-json", "adapter": "expert-json"}},  # then DELETEd
}
PATH_PARAMS = {"name": {"/docs/assets/{name}": "swagger-ui.css", "/dashboard/assets/{name}": "dashboard.js",
                        "/models/{name}": "access-json"}}  # fmt: skip


def app_routes(config_path) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, from the app object (no model is loaded)."""
    app = create_app(load_settings(config_path), AuthSettings(api_key=API_KEY, admin_token=ADMIN_TOKEN))
    routes = {(m, ctx.path) for ctx in iter_route_contexts(app.routes) for m in ctx.methods or ()}
    return sorted(routes, key=lambda r: (r[0] == "DELETE", r))  # DELETE /scalings last: it empties the log


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, world):
    return write_config(tmp_path_factory.mktemp("access"), server_config(world))


@pytest.fixture(scope="module")
def c(secured_server):
    with httpx.Client(base_url=secured_server.url, timeout=60) as client:
        yield client


def new_request(c: httpx.Client, prompt: str = "log me") -> str:
    r = c.post("/generate", json={"prompt": prompt, "max_new_tokens": 4}, headers=bearer(API_KEY))
    assert r.status_code == 200, r.text
    return r.json()["id"]


def call(c: httpx.Client, method: str, path: str, headers: dict, request_id: str, **extra) -> httpx.Response:
    url = path.replace("{request_id}", request_id)
    for name, by_path in PATH_PARAMS.items():
        if path in by_path:
            url = url.replace("{" + name + "}", by_path[path])
    assert "{" not in url, f"no value for the path parameters of {path}: add one to PATH_PARAMS"
    return c.request(method, url, headers=headers, **{**CALLS.get((method, path), {}), **extra})


def allowed(level, caller: str) -> bool:
    return {PUBLIC: True, CLIENT: caller in ("client key", "admin token"), ADMIN: caller == "admin token"}[level]


def assert_refused(r: httpx.Response, caller: str, what: str) -> None:
    assert r.status_code == 401, (what, caller, r.status_code, r.text[:300])
    assert r.headers["WWW-Authenticate"] == "Bearer", what
    error = r.json()["error"]
    assert error["type"] == "authentication_error"
    assert error["code"] == ("missing_token" if caller == "nobody" else "invalid_token"), (what, error)


def test_the_policy_levels_the_issue_names(config_path):
    levels = route_levels(load_settings(config_path).server)
    assert {p for (m, p), level in levels.items() if level is PUBLIC} >= {"/health", "/ready", "/metrics"}
    for route in [("POST", "/generate"), ("GET", "/v1/models"), ("GET", "/routing"), ("GET", "/scalings"),
                  ("GET", "/scalings/{request_id}")]:  # fmt: skip
        assert levels[route] is CLIENT, route
    assert levels[("PATCH", "/routing")] is ADMIN and levels[("DELETE", "/scalings")] is ADMIN


def test_require_key_settings_raise_metrics_and_docs_to_client(world, tmp_path):
    config = server_config(world, server={"metrics_require_key": True, "docs_require_key": True})
    levels = route_levels(load_settings(write_config(tmp_path, config)).server)
    for path in ["/metrics", "/docs", "/openapi.json", "/docs/oauth2-redirect"]:
        assert levels[("GET", path)] is CLIENT, path
    assert levels[("GET", "/docs/assets/{name}")] is PUBLIC  # Swagger UI's own files hold no data


def test_a_route_without_a_level_stops_the_app(config_path):
    app = create_app(load_settings(config_path), AuthSettings())
    levels = dict(app.state.route_levels)
    check_routes(app, levels)  # as create_app built it: complete
    with pytest.raises(RuntimeError, match="GET /nowhere has an access level but no route"):
        check_routes(app, {**levels, ("GET", "/nowhere"): PUBLIC})
    del levels[("GET", "/health")]
    with pytest.raises(RuntimeError, match="GET /health has no access level"):
        check_routes(app, levels)
    app.add_api_route("/undeclared", lambda: {}, methods=["GET"])
    with pytest.raises(RuntimeError, match="GET /undeclared has no access level"):
        check_routes(app, app.state.route_levels)


def test_every_route_answers_by_its_level(c, config_path, secured_server):
    levels = secured_server_levels(c)
    routes = app_routes(config_path)
    assert set(routes) == {tuple(k.split(" ", 1)) for k in levels}, "GET /access disagrees with the app's routes"
    request_id = new_request(c)  # for /scalings/{request_id}; only DELETE /scalings, last, removes it
    for method, path in routes:
        level = {"public": PUBLIC, "client": CLIENT, "admin": ADMIN}[levels[f"{method} {path}"]]
        for caller, headers in CALLERS.items():  # the admin token last
            r = call(c, method, path, headers, request_id)
            if allowed(level, caller):
                assert r.status_code == 200, (method, path, caller, r.status_code, r.text[:300])
            else:
                assert_refused(r, caller, f"{method} {path}")


def secured_server_levels(c: httpx.Client) -> dict[str, str]:
    r = c.get("/access")
    assert r.status_code == 200
    body = r.json()
    assert body["api_key_required"] is True and body["admin_token_required"] is True
    return body["levels"]


def test_token_texts_are_admin_level(c):
    request_id = new_request(c, prompt=f"say {MARKER}")
    for path in [f"/scalings/{request_id}", "/scalings/latest"]:
        for caller, headers in CALLERS.items():
            r = c.get(path, params={"include_text": "true"}, headers=headers)
            if caller == "admin token":
                assert r.status_code == 200, r.text
                continue
            if caller == "client key":
                assert r.status_code == 401 and "admin token" in r.json()["error"]["message"], r.text
                assert r.json()["error"]["code"] == "invalid_token"
            else:
                assert_refused(r, caller, path)
        # Numbers, without text, for the client key.
        numbers = c.get(path, headers=bearer(API_KEY)).json()
        assert numbers["tokens"] is None and numbers["scalings"]
    detail = c.get(f"/scalings/{request_id}", params={"include_text": "true"}, headers=bearer(ADMIN_TOKEN)).json()
    texts = [t["text"] for t in detail["tokens"]]
    assert len(texts) == detail["prompt_tokens"] + detail["completion_tokens"]
    assert texts[0] == "<s>" and detail["tokens"][0]["special"] is True  # the tokenizer's BOS, marked special
    assert "".join(texts[1 : detail["prompt_tokens"]]) == f"say {MARKER}"
    assert not any(t["special"] for t in detail["tokens"][1 : detail["prompt_tokens"]])


def test_no_prompt_text_or_secret_reaches_a_caller_below_admin(c, config_path, secured_server):
    request_id = new_request(c, prompt=f"keep {MARKER} quiet")
    seen = []
    for method, path in app_routes(config_path):
        if method == "DELETE":
            continue
        for caller in ("nobody", "wrong key", "client key"):
            for extra in ({}, {"params": {"include_text": "true"}}, {"params": {"bucketed": "true"}}):
                r = call(c, method, path, CALLERS[caller], request_id, **extra)
                seen.append((f"{caller} {method} {path} {extra}", path, r))
    assert len(seen) > 50
    for what, path, r in seen:
        body = r.text
        assert MARKER not in body, what
        assert API_KEY not in body and ADMIN_TOKEN not in body and WRONG not in body, what
        if r.headers.get("content-type", "").startswith("application/json") and path != "/openapi.json":
            assert not _has_text_fields(r.json()), what
    log = secured_server.log()
    assert API_KEY not in log and ADMIN_TOKEN not in log and WRONG not in log
    metrics = c.get("/metrics").text
    assert API_KEY not in metrics and ADMIN_TOKEN not in metrics and WRONG not in metrics


def _has_text_fields(value) -> bool:
    """Token texts or ids anywhere in a JSON value."""
    if isinstance(value, dict):
        if value.get("tokens") is not None or "token_ids" in value:
            return True
        return any(_has_text_fields(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_text_fields(v) for v in value)
    return False


def test_docs_reference_no_outside_host_and_their_files_answer(c):
    assert c.get("/redoc").status_code == 404  # not served: ReDoc's bundle loads its logo from outside
    for page in ["/docs"]:
        html = c.get(page).text
        assert r"http://" not in html and "https://" not in html and "//cdn" not in html, page
        refs = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ?["']([^"']+)["']""", html)
        urls = {a or b for a, b in refs}
        assert "/openapi.json" in urls and any(u.startswith("/docs/assets/") for u in urls), urls
        for url in urls:
            r = c.get(url)
            assert r.status_code == 200 and len(r.content) > 100, (page, url, r.status_code)
    assert c.get("/docs/assets/../../settings.py").status_code == 404
    assert c.get("/docs/assets/core.py").status_code == 404
    json.loads(c.get("/openapi.json").text)
