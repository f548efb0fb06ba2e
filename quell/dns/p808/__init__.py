"""P.808 listening tests, run the way the DNS challenge ran them: build, serve, analyse.

- `build.py`: folders of conditions -> a test folder: 16-bit WAV copies of every clip, generated stimuli
  (`stimuli.py`: headphone check, gold and training clips, spoken trapping messages), sessions packed at
  random with every condition balanced in each, the CSV files of the public P.808 toolkit, an offline page.
- `design.py`: the test definition (`test.json`): methods, scales, sessions, items, and what a valid vote is.
- `serve.py` + `store.py`: a local web app for in-house raters; every vote lands in SQLite.
- `page.py` + `static/`: the rating page, the same served and offline (`test.html`).
- `analyze.py`: P.808 screening (unplayed clips, failed headphone check, trap or gold, flat ratings),
  MOS / CMOS with standard deviation, n and 95% CI per clip and per condition; markdown, CSV and PNG.
"""
