"""The rating page: one HTML file with its style, script and settings inlined.

The same page runs served (`quell p808 serve`: votes go to the server) and offline (`test.html` in a built
test folder, opened from disk: progress stays in the browser, votes are downloaded as a CSV for `analyze`).
"""

from __future__ import annotations

import json
from importlib import resources


def render_page(settings: dict) -> str:
    """The page with `settings` (mode "server" or "offline", and for offline every session) inlined."""
    static = resources.files("quell.dns.p808") / "static"
    # "</" would end the inline <script> early if a clip path contained "</script>"
    embedded = json.dumps(settings).replace("</", "<\\/")
    page = (static / "page.html").read_text()
    for marker, text in (("/*STYLE*/", (static / "style.css").read_text()),
                         ("/*SCRIPT*/", (static / "app.js").read_text()), ("/*SETTINGS*/", embedded)):
        page = page.replace(marker, text)
    return page
