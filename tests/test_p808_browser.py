"""The P.808 flow in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright.

Three raters take the same session at once: two through `quell p808 serve` (one attentive, who also reloads
the page half way and goes on where he stopped; one who answers the trapping clip wrong) and one on the offline
page opened from disk, whose votes are downloaded as a CSV. Clips play in real time, so they are short.
Needs espeak-ng (building), chromium and the playwright package (not its browser download): skips without them.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from quell.dns.p808.analyze import analyze, read_votes_csv
from quell.dns.p808.build import build_test, parse_conditions
from quell.dns.p808.design import ListeningTest, Session
from quell.dns.p808.serve import open_server
from quell.dns.p808.store import read_votes

CHROMIUM = "/usr/bin/chromium"
# as the machine's probe ran it: no sandbox as root, and nothing that reaches out to the (closed) network
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install "
                                                                 "espeak-ng)"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed"),
]
async_api = pytest.importorskip("playwright.async_api", reason="the playwright package is not installed")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> ListeningTest:
    """An ACR test of 2 conditions x 2 clips of 0.4 s: one session of 4 rating clips, for 3 raters."""
    root = tmp_path_factory.mktemp("p808_browser")
    rate = 16000
    t = np.arange(round(0.4 * rate)) / rate
    for i in range(2):
        clean = 0.1 * np.sin(2 * np.pi * (140 + 40 * i) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
        for folder, clip in (("reference", clean), ("noisy", clean + 0.02 * np.random.default_rng(i).standard_normal(
                t.size)), ("mild", clean + 0.002 * np.random.default_rng(i).standard_normal(t.size))):
            (root / folder).mkdir(exist_ok=True)
            sf.write(root / folder / f"u{i}.wav", clip, rate)
    return build_test(root / "test", "acr", parse_conditions([str(root / "noisy"), str(root / "mild")]),
                      root / "reference", clips_per_session=4, raters_per_session=3, seed=1)


async def rate_session(page, session: Session, trap_answer_off: bool = False, reload_after: int | None = None):
    """Take a session as a rater would: play every step to its end, answer, go on; return the item ids seen."""
    ratings = iter([2, 4, 3, 5, 1, 4] * 3)
    seen = []
    await page.click("#start")
    while True:
        await page.wait_for_selector("#item, #finished")
        if await page.query_selector("#finished"):
            return seen
        item = session.item(await page.get_attribute("#item", "data-item"))
        if reload_after is not None and len(seen) == reload_after:
            reload_after = None
            await page.reload()  # the rater leaves and comes back: the ID is remembered, the session goes on
            await page.click("#start")
            continue
        seen.append(item.id)
        await page.click("#play")
        await page.wait_for_selector("#item[data-played='1']", timeout=30000)
        if item.role == "headphone":
            await page.select_option("#left", str(item.answer["left"]))
            await page.select_option("#right", str(item.answer["right"]))
        elif item.role != "volume":
            vote = item.answer.get("acr") or next(ratings)
            if item.role == "trap" and trap_answer_off:
                vote = 1 if vote > 3 else 5
            await page.check(f"input[name='vote-acr'][value='{vote}']")
        await page.click("#next")
        await page.wait_for_function("id => document.querySelector('#item')?.dataset.item !== id", arg=item.id)


async def offline_session(page, test: ListeningTest, download_to: Path) -> Path:
    await page.goto((test.folder / "test.html").as_uri())
    await page.fill("#rater", "carol")
    await page.select_option("#session", test.sessions[0].id)
    await rate_session(page, test.sessions[0])
    async with page.expect_download() as download:
        await page.click("#download")
    await (await download.value).save_as(download_to)
    return download_to


async def served_session(page, url: str, session: Session, rater: str, **how) -> list[str]:
    await page.goto(url)
    await page.fill("#rater", rater)
    return await rate_session(page, session, **how)


async def run_raters(test: ListeningTest, url: str, download_to: Path):
    async with async_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pages = [await (await browser.new_context()).new_page() for _ in range(3)]
        errors = []
        for page in pages:
            page.on("pageerror", lambda error: errors.append(str(error)))
        session = test.sessions[0]
        try:
            results = await asyncio.gather(
                served_session(pages[0], url, session, "alice", reload_after=4),
                served_session(pages[1], url, session, "bob", trap_answer_off=True),
                offline_session(pages[2], test, download_to))
        finally:
            await browser.close()
        assert errors == []
        return results


def test_raters_in_chromium(built, tmp_path):
    server = open_server(built.folder, tmp_path / "votes.db", port=0)
    server.start_background()
    try:
        alice, bob, offline_csv = asyncio.run(asyncio.wait_for(run_raters(built, server.url, tmp_path / "c.csv"),
                                                               timeout=120))
    finally:
        server.close()
    session = built.sessions[0]
    assert alice == bob == [item.id for item in session.items]  # every step once, also across alice's reload

    rows = read_votes(tmp_path / "votes.db")
    per_item = len(session.items) + 1  # the headphone check has two votes
    assert sorted({row["rater"] for row in rows}) == ["alice", "bob"] and len(rows) == 2 * per_item
    assert all(row["played"] == 1 and row["played_at"] <= row["voted_at"] for row in rows)
    offline_rows = read_votes_csv(offline_csv)
    assert len(offline_rows) == per_item and {row["rater"] for row in offline_rows} == {"carol"}

    analysis = analyze(built, rows + offline_rows)
    verdicts = {s.rater: (s.complete, s.rejected) for s in analysis.submissions}
    assert verdicts == {"alice": (True, []), "bob": (True, ["trap"]), "carol": (True, [])}
    assert sum(row["n"] for row in analysis.per_condition) == 2 * 4  # alice's and carol's ratings
