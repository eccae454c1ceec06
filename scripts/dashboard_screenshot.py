"""The README's dashboard picture: three requests (arithmetic, sorting, json) to a running server, then a
screenshot of /dashboard in Debian's headless Chromium.

    make serve   # in another shell (no XLORA_API_KEY / XLORA_ADMIN_TOKEN set)
    .venv/bin/python scripts/dashboard_screenshot.py --url http://127.0.0.1:8000 --out docs/dashboard.png
"""

from __future__ import annotations

import argparse

import httpx
from playwright.sync_api import sync_playwright

PROMPTS = [
    "Sort alphabetically: pear, apple, fig, banana",
    'Return JSON with keys "name" and "age" for: Ada, 36',
    "Compute: 47 + 38",  # last: the page selects the newest request
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--out", default="docs/dashboard.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    with httpx.Client(base_url=args.url, timeout=300) as client:
        for prompt in PROMPTS:
            body = {"messages": [{"role": "user", "content": prompt}], "max_new_tokens": 24}
            client.post("/generate", json=body).raise_for_status()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.goto(args.url + "/dashboard")
        page.wait_for_function("() => document.querySelectorAll('[data-testid=tokens] [data-testid=token]').length")
        page.get_by_test_id("tokens").get_by_test_id("token").last.click()  # pin one token's weights
        page.screenshot(path=args.out)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
