"""Screenshot of the playground after a run, against a running server (the picture in docs/serving.md).

    python scripts/playground_screenshot.py http://127.0.0.1:8000 --out docs/playground.png
    python scripts/playground_screenshot.py http://127.0.0.1:8000 --prompt "def merge(a, b):" --compare

Uses headless Chromium from Debian's packages (scripts/browser.py). The API key, if the server
needs one, comes from --api-key or ADASD_API_KEY. The picture is the whole page at --width; with
--hover-source a token of that source is hovered first, so the inspector shows its numbers.
On a machine with no font at all the text shows as boxes: `apt-get install fonts-dejavu-core`.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts import browser  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--out", default="docs/playground.png")
    ap.add_argument("--prompt", default="def fibonacci(n):\n")
    ap.add_argument("--chat", action="store_true", help="chat mode: the prompt is the user message")
    ap.add_argument("--method", default="adasd")
    ap.add_argument("--verification", default="bayes")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--compare", action="store_true", help="also run ar beside it")
    ap.add_argument("--hover-source", default="relaxed",
                    help="hover a token of this source (then correction, then any) so its numbers show")
    ap.add_argument("--api-key", default=os.environ.get("ADASD_API_KEY", ""))
    ap.add_argument("--width", type=int, default=1280)
    args = ap.parse_args(argv)

    fields = dict(prompt=args.prompt, method=args.method, verification=args.verification, temperature=args.temperature,
                  max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, api_key=args.api_key)
    if args.seed is not None:
        fields["seed"] = args.seed
    with browser.chromium(width=args.width, height=900) as driver:
        browser.open_playground(driver, args.url, **fields)
        if args.chat:
            driver.find_element("css selector", "input[name=mode][value=chat]").click()
        driver.find_element("id", "compare" if args.compare else "run").click()
        runs = [browser.wait_run(driver, "main", timeout=600)]
        if args.compare and runs[0]["error"] is None:
            runs.append(browser.wait_run(driver, "ar", timeout=600))
        for run in runs:
            if run["error"]:
                print(f"the run failed: {run['error']}", file=sys.stderr)
                return 1
        from selenium.webdriver.common.action_chains import ActionChains

        for source in (args.hover_source, "correction", ""):
            found = driver.find_elements("css selector", f"#out-main .tok.src-{source}" if source else "#out-main .tok")
            if found:
                ActionChains(driver).move_to_element(found[len(found) // 2]).perform()
                break
        driver.execute_script("document.getElementById('prompt').scrollTop = 0")  # the prompt's first lines
        height = driver.execute_script("return document.documentElement.scrollHeight")
        # the whole page, not the window (whose outer size is not its viewport's)
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": args.width, "height": height, "scale": 1}})
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(shot["data"]))
    usage = runs[0]["usage"] or {}
    print(f"wrote {out} ({out.stat().st_size} bytes): {len(runs[0]['sources'])} tokens, "
          f"usage.completion_tokens {usage.get('completion_tokens')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
