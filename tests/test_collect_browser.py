"""The annotation page in a real headless Chromium: judging with mouse and keyboard, reloading, hostile
model text staying inert, and the verdicts coming out of the export as they were given."""

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from align.annotation.store import Candidates, Collection
from align.collect.export import export_collection
from align.collect.server import create_app

pytest.importorskip("selenium", reason="selenium is not installed")
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions.action_builder import ActionBuilder
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

for _path in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
    if not Path(_path).exists():
        pytest.skip(f"{_path} is missing (apt-get install chromium chromium-driver)", allow_module_level=True)

SCRIPT = "<script>window.__pwned=1</script>"
IMG = '<img src=x onerror="window.__pwned=2">'
LINK = '<a href="javascript:window.__pwned=3">click me</a>'
SVG = '<svg onload="window.__pwned=4">'
PAYLOADS = (SCRIPT, IMG, LINK, SVG)
CONTAINERS = ("#prompt", "#left", "#right")


@pytest.fixture
def collection(tmp_path):
    """9 pairs (3 prompts x 3 responses), each showing all four payloads: the link in the prompt's user
    message, the others in its system message and the responses."""
    collection = Collection.create(tmp_path / "prefs.sqlite")
    collection.add([Candidates(
        [{"role": "system", "content": f"Be brief. {SVG}"}, {"role": "user", "content": f"Question {i}: {LINK}"}],
        [(f"Answer {i}.{j}\n  indented {SCRIPT} {IMG}", f"model-{j}") for j in range(3)]) for i in range(3)])
    return collection


class ServerThread:
    """The app served by uvicorn in a thread of this process, which can stop and start again on its port."""

    def __init__(self, app):
        self.app, self.port = app, 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the last run's connections linger
        self.sock.bind(("127.0.0.1", self.port))  # handed to uvicorn bound: no other process takes the port
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def server(collection):
    server = ServerThread(create_app(collection.path))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def driver():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    options.unhandled_prompt_behavior = "ignore"  # an alert stays open, for assert_no_alert to find
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    yield driver
    driver.quit()


def assert_no_alert(driver):
    with pytest.raises(NoAlertPresentException):
        _ = driver.switch_to.alert  # the property raises when no alert is open


def wait_for_pair(driver, done: int) -> dict:
    """Wait until the page shows a pair, ready to judge, with `done` judged; what it shows."""
    WebDriverWait(driver, 10).until(
        lambda d: d.find_element(By.ID, "progress-text").text == f"{done} of 9 judged"
        and d.find_element(By.ID, "task").get_attribute("aria-busy") == "false")
    text = {name: driver.find_element(By.ID, name).get_property("textContent") for name in ("left", "right")}
    question = driver.find_element(By.CSS_SELECTOR, ".message[data-role=user] .text").get_property("textContent")
    return {"question": question, **text}


def assert_inert(driver):
    """Every payload is on screen as text, none became an element, none ran."""
    assert_no_alert(driver)
    assert driver.execute_script("return typeof window.__pwned") == "undefined"
    shown = driver.find_element(By.TAG_NAME, "main").text
    for payload in PAYLOADS:
        assert payload in shown
    tags = ("script", "img", "a", "svg")
    assert driver.find_elements(By.CSS_SELECTOR, ", ".join(f"{c} {t}" for c in CONTAINERS for t in tags)) == []


def click_text(driver, element, text: str):
    """Click in the middle of `text` inside `element` (whose content is one text node)."""
    x, y = driver.execute_script(
        "const [element, text] = arguments, start = element.textContent.indexOf(text);"
        "const range = document.createRange();"
        "range.setStart(element.firstChild, start); range.setEnd(element.firstChild, start + text.length);"
        "const box = range.getBoundingClientRect(); return [box.x + box.width / 2, box.y + box.height / 2];",
        element, text)
    actions = ActionBuilder(driver)
    actions.pointer_action.move_to_location(int(x), int(y)).click()
    actions.perform()


def test_judging_in_a_browser(collection, server, driver, tmp_path):
    base_url = server.url
    alice = collection.add_annotator("alice")
    driver.get(f"{base_url}/a/{alice.token}")

    def press(key):
        ActionChains(driver).send_keys(key).perform()

    def click(choice):
        driver.find_element(By.CSS_SELECTOR, f"[data-choice={choice}]").click()

    given = []  # (what was shown, choice, rationale)
    shown = wait_for_pair(driver, 0)
    assert_inert(driver)
    link = driver.find_element(By.CSS_SELECTOR, ".message[data-role=user] .text")
    click_text(driver, link, "click me")
    assert driver.current_url == f"{base_url}/a/{alice.token}" and len(driver.window_handles) == 1
    assert_inert(driver)

    click("left")  # mouse
    given.append((shown, "left", ""))
    shown = wait_for_pair(driver, 1)
    press(Keys.ARROW_RIGHT)  # keyboard
    given.append((shown, "right", ""))

    shown = wait_for_pair(driver, 2)
    rationale = "A says it plainly: 1 2 3 t x"  # shortcut keys typed into the box are text, not choices
    box = driver.find_element(By.ID, "rationale")
    box.send_keys(rationale)
    assert box.get_property("value") == rationale
    assert driver.find_element(By.ID, "task").get_attribute("aria-busy") == "false"  # nothing was sent
    press(Keys.ESCAPE)  # leaves the box
    press("1")
    given.append((shown, "left", rationale))

    shown = wait_for_pair(driver, 3)
    assert driver.find_element(By.ID, "rationale").get_property("value") == ""
    press("t")
    given.append((shown, "tie", ""))
    shown = wait_for_pair(driver, 4)
    click("both_bad")
    given.append((shown, "both_bad", ""))

    held = wait_for_pair(driver, 5)
    driver.refresh()
    assert wait_for_pair(driver, 5) == held  # the server kept the pair it gave out, and the progress
    assert_inert(driver)

    pairs = {frozenset((p["a"]["text"], p["b"]["text"])): p for p in collection.pairs()}
    expected_verdicts, expected_rows = [], []
    for shown, choice, rationale in given:
        pair = pairs[frozenset((shown["left"], shown["right"]))]
        assert shown["question"] == pair["prompt"][1]["content"]
        if choice in ("left", "right"):
            chosen, rejected = ((shown["left"], shown["right"]) if choice == "left"
                                else (shown["right"], shown["left"]))
            expected_rows.append((pair["pair_id"], chosen, rejected))
            choice = "a" if chosen == pair["a"]["text"] else "b"
        expected_verdicts.append((pair["pair_id"], "alice", choice, rationale))
    assert [(v["pair_id"], v["annotator"], v["choice"], v["rationale"]) for v in collection.verdicts()] == \
        expected_verdicts

    out = tmp_path / "prefs.jsonl"
    summary = export_collection(collection, out, kind="preference", aggregate="all", who="humans")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["pair_id"], r["chosen"], r["rejected"]) for r in rows) == sorted(expected_rows)
    assert all(r["prompt"] == pairs[frozenset((r["chosen"], r["rejected"]))]["prompt"] for r in rows)
    assert summary["rows"] == 3 and summary["left_out"] == {"tie": 1, "both_bad": 1}


def test_a_choice_made_while_the_server_is_down_is_sent_once_it_is_back(collection, server, driver):
    alice = collection.add_annotator("alice")
    driver.get(f"{server.url}/a/{alice.token}")
    shown = wait_for_pair(driver, 0)
    server.stop()
    driver.find_element(By.CSS_SELECTOR, "[data-choice=right]").click()
    status = driver.find_element(By.ID, "status")
    WebDriverWait(driver, 10).until(lambda d: status.text.startswith("Reconnecting…"))
    # the choice is kept, and no other can be made meanwhile
    assert len(driver.find_elements(By.CSS_SELECTOR, "[data-choice]:disabled")) == 4
    assert [b.get_attribute("data-choice") for b in driver.find_elements(By.CSS_SELECTOR, ".chosen")] == ["right"]
    server.start()
    wait_for_pair(driver, 1)
    assert not status.is_displayed()
    pair = next(p for p in collection.pairs() if {p["a"]["text"], p["b"]["text"]} == {shown["left"], shown["right"]})
    [verdict] = collection.verdicts()
    picked = "a" if pair["a"]["text"] == shown["right"] else "b"
    assert (verdict["pair_id"], verdict["choice"]) == (pair["pair_id"], picked)


def test_a_refused_verdict_shows_why_and_is_not_sent_again(collection, server, driver):
    alice = collection.add_annotator("alice")
    driver.get(f"{server.url}/a/{alice.token}")
    wait_for_pair(driver, 0)
    box = driver.find_element(By.ID, "rationale")
    driver.execute_script("arguments[0].value = 'fine \\ud800'", box)  # a lone surrogate: no file can store it
    driver.find_element(By.CSS_SELECTOR, "[data-choice=left]").click()
    status = driver.find_element(By.ID, "status")
    WebDriverWait(driver, 10).until(lambda d: "not valid text" in status.text)
    assert status.get_attribute("class") == "error"
    time.sleep(1)  # a retry would come within half a second
    sent = driver.execute_script(
        "return performance.getEntriesByType('resource').filter((e) => e.name.endsWith('/verdict')).length")
    assert sent == 1 and collection.verdicts() == []
    assert driver.find_elements(By.CSS_SELECTOR, "[data-choice]:disabled") == []  # the person may try again
    box.clear()
    driver.find_element(By.CSS_SELECTOR, "[data-choice=left]").click()
    wait_for_pair(driver, 1)
    assert not status.is_displayed() and len(collection.verdicts()) == 1
