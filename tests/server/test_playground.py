"""The playground in a real browser: headless Chromium (Debian's package, driven by selenium)
against the shared test server (API key on). The page loads, a request streams, every token is a
coloured span (as many as usage.completion_tokens, with the classes the API reported), the legend
matches, errors in the OpenAI shape are shown, the keyboard reaches everything and the text copies
as plain text."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from server_support import API_KEY

from scripts import browser

SOURCES = ["standard", "relaxed", "correction", "bonus", "forced", "ar"]
PROMPT = "def parse(line):\n"


@pytest.fixture(scope="module")
def page(server):
    problem = browser.missing()
    if problem:  # the suite allows no skip: say what to install
        pytest.fail(problem)
    with browser.chromium() as driver:
        driver.set_script_timeout(60)
        yield driver


def open_page(page, server, prompt: str = PROMPT, **fields) -> None:
    browser.open_playground(page, server.base_url, prompt=prompt, **fields)


def wait_done(page, panel: str = "main") -> dict:
    return browser.wait_run(page, panel, timeout=90)


def spans(page, panel: str = "main") -> list[dict]:
    return page.execute_script(
        "return [...document.querySelectorAll('#out-' + arguments[0] + ' .tok')]"
        ".map(s => ({cls: [...s.classList], text: s.textContent, title: s.title}))", panel)


def source_of(span: dict) -> str:
    (cls,) = [c for c in span["cls"] if c.startswith("src-")]
    return cls.removeprefix("src-")


def counter(page, key: str, panel: str = "main") -> str:
    return page.find_element("css selector", f"#counters-{panel} dd[data-key={key}]").text


def test_index_links_to_the_playground_with_a_strict_policy(server):
    with server.http() as http:
        index = http.get("/")
        assert index.status_code == 200 and 'href="/playground"' in index.text
        r = http.get("/playground")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in r.headers["content-security-policy"]
        for asset in ("playground.js", "playground.css"):
            assert http.get(f"/playground/{asset}").status_code == 200
        missing = http.get("/playground/nothing.js")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
        assert "/playground" not in http.get("/openapi.json").json()["paths"]  # not part of the API


def test_a_run_streams_and_colours_every_token_as_the_api_reported(page, server, tmp_path):
    settings = dict(method="adasd", verification="threshold", temperature=0, max_tokens=40, seed=5)
    open_page(page, server, api_key=API_KEY, warm_start=False, ignore_eos=True, **settings)
    errors = [e for e in page.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors  # loaded without a console error (CSP, missing files)
    page.find_element("id", "run").click()
    run = wait_done(page)
    assert run["error"] is None

    # it streamed: several chunks, each adding tokens, before the end
    log = run["chunkLog"]
    assert len(log) > 2 and [c["tokens"] for c in log] == sorted(c["tokens"] for c in log)
    assert log[0]["tokens"] < log[-1]["tokens"] and log[0]["ms"] < log[-1]["ms"]

    got = spans(page)
    assert len(got) == run["usage"]["completion_tokens"] == 40
    assert counter(page, "completion_tokens") == counter(page, "tokens") == "40"
    assert [source_of(s) for s in got] == [t["source"] for t in run["sources"]]
    assert "".join(s["text"] for s in got) == run["text"]

    # the same request straight to the API (seeded, no warm start: the same tokens and sources)
    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "seed": 5, "ignore_eos": True,
            "adasd": {"token_sources": True, "method": "adasd", "verification": "threshold", "warm_start": False}}
    with server.http() as http:
        api = http.post("/v1/completions", json=body).json()["choices"][0]
    assert [source_of(s) for s in got] == [t["source"] for t in api["adasd"]["token_sources"]]
    assert run["text"] == api["text"]

    # the legend: one entry per source, its swatch of the same class, its count that of the spans
    legend = page.execute_script(
        "return [...document.querySelectorAll('#legend .legend-item')].map(li => ({source: li.dataset.source,"
        " swatch: [...li.querySelector('.tok').classList], count: Number(li.querySelector('.count').textContent)}))")
    assert [item["source"] for item in legend] == SOURCES
    counts = Counter(source_of(s) for s in got)
    for item in legend:
        assert f"src-{item['source']}" in item["swatch"] and item["count"] == counts.get(item["source"], 0)
    assert set(counts) <= set(SOURCES)

    # hover: a token's numbers, in its title and in the inspector
    from selenium.webdriver.common.action_chains import ActionChains

    target = page.find_elements("css selector", "#out-main .tok")[1]
    ActionChains(page).move_to_element(target).perform()
    title = got[1]["title"]
    assert f"round {run['sources'][1]['round']}" in title and run["sources"][1]["source"] in title
    assert page.find_element("id", "inspect-main").text.startswith("Token 2 of 40")

    # plain text: selecting the output copies exactly the generated text
    selected = page.execute_script(
        "const r = document.createRange(); r.selectNodeContents(document.getElementById('out-main'));"
        "const s = window.getSelection(); s.removeAllRanges(); s.addRange(r); return s.toString()")
    assert selected == api["text"]

    shot = tmp_path / "playground.png"
    page.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_compare_runs_ar_beside_it(page, server):
    open_page(page, server, api_key=API_KEY, method="vanilla", max_tokens=24, ignore_eos=True)
    page.find_element("id", "compare").click()
    main, ar = wait_done(page, "main"), wait_done(page, "ar")
    assert main["error"] is None and ar["error"] is None
    assert page.find_element("id", "panel-ar").is_displayed()
    assert {source_of(s) for s in spans(page, "ar")} == {"ar"} and len(spans(page, "ar")) == 24
    assert set(source_of(s) for s in spans(page, "main")) <= {"standard", "correction", "bonus", "ar"}  # lossless
    text = page.find_element("id", "comparison").text
    assert "vanilla: 24 tokens" in text and "ar: 24 tokens" in text and "x ar's tokens/s" in text


def test_chat_mode_streams_the_assistant_reply(page, server):
    open_page(page, server, api_key=API_KEY, max_tokens=16)
    page.find_element("css selector", "input[name=mode][value=chat]").click()
    assert page.find_element("id", "system").is_displayed()
    page.find_element("id", "run").click()
    run = wait_done(page)
    assert run["error"] is None and len(spans(page)) == run["usage"]["completion_tokens"] > 0


def test_server_errors_are_shown_readably(page, server):
    open_page(page, server, max_tokens=20)  # no API key yet
    page.find_element("id", "run").click()
    wait_done(page)
    box = page.find_element("id", "error")
    assert box.is_displayed() and "401" in box.text and "authentication_error" in box.text and "API key" in box.text
    assert page.switch_to.active_element.get_attribute("id") == "api-key"  # where to act next

    open_page(page, server, api_key=API_KEY, max_tokens=100_000)  # beyond the context: a 400
    page.find_element("id", "run").click()
    run = wait_done(page)
    box = page.find_element("id", "error")
    assert box.is_displayed() and box.get_attribute("role") == "alert"
    assert "400" in box.text and "param max_tokens" in box.text and "context" in box.text
    assert "context" in run["error"] and not spans(page)
    with server.http() as http:  # the message is the server's own
        api = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 100_000, "model": "tiny"})
    assert api.json()["error"]["message"] in box.text


def test_keyboard_runs_and_inspects(page, server):
    from selenium.webdriver.common.keys import Keys

    open_page(page, server, api_key=API_KEY, max_tokens=12, ignore_eos=True)
    prompt = page.find_element("id", "prompt")
    prompt.send_keys(Keys.CONTROL, Keys.ENTER)  # runs from the prompt
    wait_done(page)
    assert len(spans(page)) == 12
    # tab order: from the API key field, Tab reaches Run, then the compare button
    page.find_element("id", "api-key").click()
    page.switch_to.active_element.send_keys(Keys.TAB)
    assert page.switch_to.active_element.get_attribute("id") == "run"
    page.switch_to.active_element.send_keys(Keys.TAB)
    assert page.switch_to.active_element.get_attribute("id") == "compare"
    out = page.find_element("id", "out-main")
    assert out.get_attribute("tabindex") == "0"
    out.send_keys(Keys.ARROW_RIGHT)
    assert page.find_element("id", "inspect-main").text.startswith("Token 1 of 12")
    out.send_keys(Keys.END)
    assert page.find_element("id", "inspect-main").text.startswith("Token 12 of 12")
    current = page.find_elements("css selector", "#out-main .tok.current")
    assert len(current) == 1 and current[0].get_attribute("data-i") == "11"
    # the sources differ by more than hue: each has its own lines (under, over) and line style
    styles = page.execute_script(
        "return [...document.querySelectorAll('#legend .legend-item .tok')]"
        ".map(s => getComputedStyle(s).textDecorationLine + ' ' + getComputedStyle(s).textDecorationStyle)")
    assert len(set(styles)) == len(SOURCES), styles


def test_a_json_schema_constrains_the_output_and_its_forced_tokens_show(page, server):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    open_page(page, server, api_key=API_KEY, max_tokens=32, json_schema=json.dumps(schema))
    page.find_element("id", "run").click()
    run = wait_done(page)
    assert run["error"] is None
    assert isinstance(json.loads(run["text"])["ok"], bool)  # the tiny model's text, held to the schema
    got = spans(page)
    assert "forced" in {source_of(s) for s in got}  # '{"ok": ' has one way to be written
    assert [source_of(s) for s in got] == [t["source"] for t in run["sources"]]

    open_page(page, server, api_key=API_KEY, json_schema="{not json")  # caught in the page, nothing sent
    page.find_element("id", "run").click()
    box = page.find_element("id", "error")
    assert box.is_displayed() and "not JSON" in box.text
    assert page.switch_to.active_element.get_attribute("id") == "json-schema"
    assert page.execute_script("return Object.keys(window.adasdPlayground.runs).length") == 0


def test_api_key_stays_in_the_page(page, server):
    open_page(page, server, api_key=API_KEY, max_tokens=4)
    page.find_element("id", "run").click()
    wait_done(page)
    stored = page.execute_script("return JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage),"
                                 " document.cookie])")
    assert API_KEY not in stored and json.loads(stored) == [[], [], ""]
