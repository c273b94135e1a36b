"""Render an inspect report.html in headless Chromium and save a PNG screenshot.

    python scripts/screenshot_report.py inspect-smollm2-135m/report.html docs/inspect-report.png

Uses Debian's `chromium` (apt-get install -y chromium) or any chromium/google-chrome on PATH,
with a throw-away profile and every network-touching feature off: the report is self-contained,
so a correct render proves that nothing external is needed. Exit status 0 only when the
screenshot was written and is a non-trivial PNG. `find_chromium()` and `screenshot()` are reused
by the report-rendering test.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def find_chromium() -> str | None:
    """Path of a Chromium-family browser on PATH, or None."""
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(
    html: Path, png: Path, *, width: int = 1280, height: int = 2000, timeout: float = 120.0
) -> Path:
    """Render `html` headless into `png` (width x height pixels); raise RuntimeError on failure."""
    browser = find_chromium()
    if browser is None:
        raise RuntimeError("no chromium on PATH: install it with `apt-get install -y chromium`")
    html, png = Path(html).resolve(), Path(png).resolve()
    if not html.is_file():
        raise FileNotFoundError(f"{html} does not exist: run `rankwise inspect MODEL` first")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rankwise-chromium-") as profile:
        tmp_png = Path(profile) / "shot.png"
        cmd = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={tmp_png}",
            f"--window-size={width},{height}",
            html.as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if not tmp_png.is_file() or tmp_png.read_bytes()[:8] != PNG_MAGIC:
            raise RuntimeError(
                f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
            )
        shutil.move(str(tmp_png), png)
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("html", type=Path, help="report.html written by `rankwise inspect`")
    parser.add_argument("png", type=Path, nargs="?", default=Path("docs/inspect-report.png"))
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2000)
    args = parser.parse_args(argv)
    try:
        out = screenshot(args.html, args.png, width=args.width, height=args.height)
    except (RuntimeError, FileNotFoundError, subprocess.TimeoutExpired) as exc:
        print(f"screenshot failed: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
