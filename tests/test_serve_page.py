"""The chat page in a real browser: Debian's chromium and chromium-driver through Selenium, headless, offline.

Skipped, saying so, where chromium is not installed; .ci/run installs it with apt-get. The README's picture of
the page is taken with these helpers: ``python tests/test_serve_page.py CKPT docs/images/serve-page.png``.
"""

import asyncio
import json
import os
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, StreamingResponse
from selenium.webdriver.common.by import By
from test_serve import byte_encoding, running_server, tiny_checkpoint

from gptmini.serve.app import page_html
from gptmini.serve.run import bind

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def open_browser(width: int = 1100, height: int = 720):
    """Headless chromium with its own driver: no Selenium Manager, no network (SE_OFFLINE)."""
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))


@pytest.fixture(scope="module")
def browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"no {' and '.join(missing)}: apt-get install -y chromium chromium-driver (.ci/run does)")
    driver = open_browser()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", byte_encoding())


def wait_for(condition, seconds: float = 30.0):
    """Poll until ``condition()`` is truthy and return it (timing itself is never asserted)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"still false after {seconds} s: {condition.__doc__ or condition}")


def fill(browser, element_id: str, value) -> None:
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def last_reply(browser, kind: str = "assistant") -> str:
    replies = browser.find_elements(By.CSS_SELECTOR, f"#messages .msg.{kind}")
    return replies[-1].get_property("textContent") if replies else ""


def test_page_streams_a_reply_and_stop_ends_it_on_the_server(browser, ckpt):
    with running_server(ckpt) as server:
        engine = server.site.engine
        browser.get(f"{server.url}/")
        wait_for(lambda: browser.find_element(By.ID, "model").text == server.site.model_id)
        fill(browser, "max-tokens", 4000)
        fill(browser, "input", "Hello")
        browser.find_element(By.ID, "send").click()
        first = wait_for(lambda: last_reply(browser))  # text arrives ...
        wait_for(lambda: len(last_reply(browser)) > len(first))  # ... and keeps arriving while it streams
        assert engine.active == 1 and browser.find_element(By.ID, "stop").is_enabled()
        job = engine.running()[0]
        browser.find_element(By.ID, "stop").click()
        wait_for(lambda: engine.active == 0)  # the server stopped generating it
        assert job.cancelled and job.produced < 4000
        status = wait_for(lambda: browser.find_element(By.ID, "status").text)
        assert "tokens/s" in status and "(stopped)" in status

        # A reply that runs to its end, then the plain-completion mode.
        browser.find_element(By.ID, "clear").click()
        fill(browser, "max-tokens", 40)
        fill(browser, "input", "Hi there")
        browser.find_element(By.ID, "send").click()
        wait_for(lambda: "(length)" in browser.find_element(By.ID, "status").text)
        assert "last reply: 40 tokens" in browser.find_element(By.ID, "status").text
        browser.find_element(By.CSS_SELECTOR, "#mode option[value=completion]").click()
        fill(browser, "input", "def main(")
        browser.find_element(By.ID, "send").click()
        wait_for(
            lambda: (
                "(length)" in browser.find_element(By.ID, "status").text and last_reply(browser, "completion")
            )
        )
        assert last_reply(browser, "completion").startswith("def main(")
        assert len(last_reply(browser, "completion")) > len("def main(")


# ---------------------------------------------------------------------------------------------------------
# The page's event parser against a server that splits its events anywhere
# ---------------------------------------------------------------------------------------------------------

REPLY = 'Hi <script>window.injected = 1</script><b>bold</b> & "quotes" é 😀 ünïcode\nline two'


def split_events() -> bytes:
    """A chat stream of REPLY, three characters per chunk, as OpenAI sends it."""
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    ]
    chunks += [
        {"choices": [{"index": 0, "delta": {"content": REPLY[i : i + 3]}, "finish_reason": None}]}
        for i in range(0, len(REPLY), 3)
    ]
    chunks.append(
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": {"completion_tokens": 9}}
    )
    events = [f"data: {json.dumps(c, ensure_ascii=False)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
    return "".join(events).encode()


def splitting_app() -> FastAPI:
    """The real page, and a chat endpoint that sends its events in 7-byte pieces: reads end inside lines,
    inside JSON and inside UTF-8 characters."""
    app = FastAPI()

    @app.get("/")
    async def index() -> HTMLResponse:
        return HTMLResponse(page_html())

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "splitter", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat() -> StreamingResponse:
        async def pieces():
            data = split_events()
            for i in range(0, len(data), 7):
                yield data[i : i + 7]
                await asyncio.sleep(0.003)  # each piece its own network write

        return StreamingResponse(pieces(), media_type="text/event-stream")

    return app


def test_page_joins_events_split_across_reads_and_inserts_text_as_text(browser):
    listener = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(splitting_app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started)
        browser.get(f"http://127.0.0.1:{listener.getsockname()[1]}/")
        fill(browser, "input", "Say something dangerous")
        browser.find_element(By.ID, "send").click()
        wait_for(lambda: "(stop)" in browser.find_element(By.ID, "status").text)
        assert last_reply(browser) == REPLY  # every split event joined, every character whole
        assert browser.find_elements(By.CSS_SELECTOR, "#messages script, #messages b") == []
        assert browser.execute_script("return window.injected") is None
        assert "last reply: 9 tokens" in browser.find_element(By.ID, "status").text
    finally:
        server.should_exit = True
        thread.join(10)


def take_screenshot(ckpt: str, path: str, message: str = "ROMEO:", max_tokens: int = 60) -> None:
    """The page after one chat reply from ``ckpt``, saved to ``path`` (the README's picture)."""
    with running_server(ckpt) as server:
        browser = open_browser(1000, 700)
        try:
            browser.get(f"{server.url}/")
            wait_for(lambda: browser.find_element(By.ID, "model").text)
            fill(browser, "max-tokens", max_tokens)
            fill(browser, "input", message)
            browser.find_element(By.ID, "send").click()
            wait_for(lambda: "last reply" in browser.find_element(By.ID, "status").text, seconds=300)
            browser.save_screenshot(path)
        finally:
            browser.quit()


if __name__ == "__main__":
    import sys

    take_screenshot(*sys.argv[1:3], *sys.argv[3:4])
