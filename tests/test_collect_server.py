"""The annotation server's HTTP surface, in-process through Starlette's TestClient."""

import http.client
import json
import re
import socket
import threading
import time

import pytest
import uvicorn
from starlette.testclient import TestClient

from align.annotation.store import Candidates, Collection
from align.collect.server import SECURITY_HEADERS, create_app

PROMPTS = [[{"role": "user", "content": f"Question {i}?"}] for i in range(2)]


@pytest.fixture
def collection(tmp_path):
    collection = Collection.create(tmp_path / "prefs.sqlite")
    collection.add([Candidates(prompt, [(f"answer {i}.{j}", f"model-{j}") for j in range(3)])
                    for i, prompt in enumerate(PROMPTS)])  # 2 prompts x 3 pairs
    return collection


@pytest.fixture
def client(collection):
    return TestClient(create_app(collection.path))


def verdict(task: dict, choice: str, submission: str, **extra) -> dict:
    return {"handle": task["handle"], "choice": choice, "submission": submission, **extra}


def pair_of(collection, task: dict) -> dict:
    """The stored pair a task shows (its texts tell, as the page sends no id)."""
    return next(p for p in collection.pairs() if {p["a"]["text"], p["b"]["text"]} == {task["left"], task["right"]})


def test_next_and_verdict_round_trip(collection, client):
    alice = collection.add_annotator("alice")
    response = client.get(f"/api/{alice.token}/next")
    assert response.status_code == 200
    task = response.json()
    assert set(task) == {"handle", "prompt", "left", "right", "progress"}
    assert task["progress"] == {"done": 0, "total": 6}
    assert "model-" not in response.text  # blind: no model names reach the page

    response = client.post(f"/api/{alice.token}/verdict",
                           json=verdict(task, "left", "s-1", rationale="clearer", seconds=4.5))
    assert response.status_code == 200
    assert response.json() == {"repeated": False, "progress": {"done": 1, "total": 6}}

    [stored] = collection.verdicts()
    pair = pair_of(collection, task)
    assert stored["pair_id"] == pair["pair_id"]
    assert stored["choice"] == ("a" if task["left"] == pair["a"]["text"] else "b")
    assert (stored["annotator"], stored["rationale"], stored["seconds"]) == ("alice", "clearer", 4.5)
    assert pair_of(collection, client.get(f"/api/{alice.token}/next").json()) != pair


def test_the_page_sees_handles_and_texts_only(collection, client):
    """Ids follow the order responses were stored in, and so the models: none may reach the page. Two people
    given the same pair see the same JSON but for the handle and, perhaps, the order of the texts."""
    collection.set_overlap(2)
    alice, bob = collection.add_annotator("alice"), collection.add_annotator("bob")
    tasks = [client.get(f"/api/{who.token}/next").json() for who in (alice, bob)]
    assert pair_of(collection, tasks[0]) == pair_of(collection, tasks[1])  # the fullest pair goes first
    assert tasks[0]["handle"] != tasks[1]["handle"]
    for task in tasks:
        assert set(task) == {"handle", "prompt", "left", "right", "progress"}
        assert isinstance(task["left"], str) and isinstance(task["right"], str)
        assert re.fullmatch(r"[\w-]{20,}", task["handle"])  # random, not a number
        task.pop("handle")
        if task["left"] > task["right"]:
            task["left"], task["right"] = task["right"], task["left"]
    assert tasks[0] == tasks[1]

    response = client.post(f"/api/{alice.token}/verdict", json=verdict({"handle": "nope"}, "left", "s-1"))
    assert response.status_code == 400 and not re.search(r"\d", response.json()["error"])  # errors name no id


def test_a_verdict_counts_only_on_an_open_assignment_of_its_annotator(collection, client):
    collection.set_overlap(2)
    alice, bob, cy = (collection.add_annotator(name) for name in ("alice", "bob", "cy"))
    task = client.get(f"/api/{alice.token}/next").json()
    pair = pair_of(collection, task)
    left_id = pair["a"]["id"] if task["left"] == pair["a"]["text"] else pair["b"]["id"]
    right_id = pair["a"]["id"] + pair["b"]["id"] - left_id
    forgeries = [
        (bob, verdict(task, "left", "f-1")),  # alice's handle, bob's token: he may not decide her pair
        (bob, {"pair_id": pair["pair_id"], "left_id": left_id, "choice": "left", "submission": "f-2"}),  # ids
        (cy, {"handle": str(pair["pair_id"]), "choice": "left", "submission": "f-3"}),  # an id for a handle
        (alice, verdict(task, "left", "f-4", left_id=right_id)),  # a claimed side: refused, not trusted
    ]
    for who, body in forgeries:
        response = client.post(f"/api/{who.token}/verdict", json=body)
        assert response.status_code == 400, body
    assert client.post(f"/api/{alice.token}/verdict", json=verdict(task, "right", "s-1")).status_code == 200
    again = client.post(f"/api/{alice.token}/verdict", json=verdict(task, "left", "s-2"))  # a second vote
    assert again.status_code == 400 and "judged this pair already" in again.json()["error"]
    [stored] = collection.verdicts()
    assert (stored["annotator"], stored["pair_id"], stored["left_id"]) == ("alice", pair["pair_id"], left_id)
    assert stored["choice"] == ("a" if right_id == pair["a"]["id"] else "b")


def test_the_same_submission_sent_twice_counts_once(collection, client):
    alice = collection.add_annotator("alice")
    task = client.get(f"/api/{alice.token}/next").json()
    first = client.post(f"/api/{alice.token}/verdict", json=verdict(task, "tie", "s-1")).json()
    again = client.post(f"/api/{alice.token}/verdict", json=verdict(task, "tie", "s-1")).json()
    assert again == first | {"repeated": True}
    assert len(collection.verdicts()) == 1


def test_reload_gets_the_held_pair_and_done_when_nothing_is_left(collection, client):
    alice = collection.add_annotator("alice")
    task = client.get(f"/api/{alice.token}/next").json()
    assert client.get(f"/api/{alice.token}/next").json() == task  # same pair, same sides, same handle
    for n in range(6):
        client.post(f"/api/{alice.token}/verdict", json=verdict(task, "right", f"s-{n}"))
        task = client.get(f"/api/{alice.token}/next").json()
    assert task == {"done": True, "progress": {"done": 6, "total": 6}}


STAND_INS = {"DEEP": "[" * 20_000 + "]" * 20_000,  # deeper than Python's recursion limit, within MAX_BODY
             "HUGE": "1" + "0" * 400}  # an integer no float can hold


@pytest.mark.parametrize("body, message", [
    ('not json', "must be a JSON object"),
    ('[1, 2]', "must be a JSON object"),
    ('{"handle": DEEP, "choice": "left", "submission": "s"}', "must be a JSON object"),
    ('{"handle": HANDLE, "choice": "left"}', "field 'submission' is missing"),
    ('{"choice": "left", "submission": "s"}', "field 'handle' is missing"),
    ('{"handle": 1, "choice": "left", "submission": "s"}', "field 'handle' must be a string, got 1"),
    ('{"handle": [[1]], "choice": "left", "submission": "s"}', "field 'handle' must be a string, got an array"),
    ('{"handle": HANDLE, "choice": "maybe", "submission": "s"}', "choice must be one of"),
    ('{"handle": HANDLE, "choice": "left", "submission": ""}', "a submission needs an id"),
    ('{"handle": HANDLE, "choice": "left", "submission": "s", "seconds": -1}', "'seconds' must be"),
    ('{"handle": HANDLE, "choice": "left", "submission": "s", "seconds": NaN}', "'seconds' must be"),
    ('{"handle": HANDLE, "choice": "left", "submission": "s", "seconds": 1e999}', "'seconds' must be"),
    ('{"handle": HANDLE, "choice": "left", "submission": "s", "seconds": HUGE}', "'seconds' must be"),
    ('{"handle": HANDLE, "choice": "left", "submission": "s", "rationale": 3}', "'rationale' must be"),
    ('{"handle": HANDLE, "choice": "left", "submission": "s", "rationale": "\\ud800"}', "'rationale' is not valid"),
    ('{"handle": HANDLE, "choice": "left", "submission": "\\udfff"}', "'submission' is not valid text"),
    ('{"handle": "\\ud800", "choice": "left", "submission": "s"}', "'handle' is not valid text"),
    ('{"handle": HANDLE, "choice": "left", "submission": "s", "left_id": 1}', "unknown field 'left_id'"),
    ('{"handle": "nope", "choice": "left", "submission": "s"}', "not (or no longer) yours"),
])
def test_bad_verdicts_get_400_with_a_message(collection, body, message):
    client = TestClient(create_app(collection.path), raise_server_exceptions=False)  # a 500 is an answer here
    alice = collection.add_annotator("alice")
    stand_ins = STAND_INS | {"HANDLE": json.dumps(client.get(f"/api/{alice.token}/next").json()["handle"])}
    for name, value in stand_ins.items():
        body = body.replace(name, value)
    response = client.post(f"/api/{alice.token}/verdict", content=body.encode(),
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert_safe_headers(response)
    assert collection.verdicts() == []


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_verdict_that_is_not_json_by_its_type_gets_415(collection, client, content_type):
    """A page on another site can send these types without asking first (no CORS preflight)."""
    alice = collection.add_annotator("alice")
    body = json.dumps(verdict(client.get(f"/api/{alice.token}/next").json(), "left", "s-1")).encode()
    response = client.post(f"/api/{alice.token}/verdict", content=body,
                           headers={"Content-Type": content_type} if content_type else {})
    assert response.status_code == 415 and "application/json" in response.json()["error"]
    assert_safe_headers(response)
    assert collection.verdicts() == []
    response = client.post(f"/api/{alice.token}/verdict", content=body,
                           headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert response.status_code == 200


def test_a_submission_id_cannot_be_reused_for_another_pair(collection, client):
    alice = collection.add_annotator("alice")
    first = client.get(f"/api/{alice.token}/next").json()
    client.post(f"/api/{alice.token}/verdict", json=verdict(first, "left", "s-1"))
    second = client.get(f"/api/{alice.token}/next").json()
    response = client.post(f"/api/{alice.token}/verdict", json=verdict(second, "left", "s-1"))
    assert response.status_code == 400 and "another pair" in response.json()["error"]


def test_unknown_tokens_get_404(collection, client):
    judge = collection.add_annotator("judge", kind="ai")  # AI judges record through `align collect judge`
    for token in ("nope", judge.token):
        for response in (client.get(f"/api/{token}/next"), client.post(f"/api/{token}/verdict", json={})):
            assert response.status_code == 404 and "not valid" in response.json()["error"]
        page = client.get(f"/a/{token}")
        assert page.status_code == 404 and "not valid" in page.text
    assert client.get("/admin/wrong").status_code == 404
    assert client.get("/admin/é").status_code == 404
    assert client.get("/api/nope/other").json() == {"error": "Not Found"}


def test_oversized_bodies_are_refused(collection, client):
    alice = collection.add_annotator("alice")
    response = client.post(f"/api/{alice.token}/verdict", content=b" " * 100_000,
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 413


@pytest.mark.parametrize("path", ["/api/TOKEN/next", "/a/TOKEN"])
def test_a_server_failure_is_a_message_with_the_headers(collection, monkeypatch, path):
    alice = collection.add_annotator("alice")
    client = TestClient(create_app(collection.path), raise_server_exceptions=False)

    def broken(*args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Collection, "annotator", broken)
    response = client.get(path.replace("TOKEN", alice.token))
    assert response.status_code == 500
    assert_safe_headers(response)
    assert "server failed" in response.text and "disk on fire" not in response.text
    assert "Traceback" not in response.text


BOUND = "http://127.0.0.1:8123"  # what the client connects to: the server's address and port


@pytest.mark.parametrize("bind, host, allowed", [
    ("127.0.0.1", "127.0.0.1:8123", True),
    ("127.0.0.1", "localhost:8123", True),
    ("127.0.0.1", "LocalHost:8123", True),
    ("127.0.0.1", "[::1]:8123", True),
    ("0.0.0.0", "0.0.0.0:8123", True),
    ("annotate.lan", "annotate.lan:8123", True),
    ("127.0.0.1", "annotate.lan:8123", False),  # a name the server was not bound to
    ("127.0.0.1", "attacker.example:8123", False),  # DNS rebinding: the attacker's name, this address
    ("127.0.0.1", "localhost.attacker.example:8123", False),
    ("127.0.0.1", "127.0.0.1:9999", False),  # another port
    ("127.0.0.1", "localhost", False),
])
def test_requests_must_name_this_server(collection, bind, host, allowed):
    alice = collection.add_annotator("alice")
    client = TestClient(create_app(collection.path, host=bind), base_url=BOUND)
    for path in (f"/api/{alice.token}/next", f"/a/{alice.token}", f"/admin/{collection.admin_token}"):
        response = client.get(path, headers={"Host": host})
        assert (response.status_code == 200) == allowed, path
        assert_safe_headers(response)
    if not allowed:
        assert "open the link" in response.text and collection.admin_token not in response.text


@pytest.mark.parametrize("local, host, allowed", [
    ("10.0.0.5", "10.0.0.5:8123", True),
    ("[::ffff:10.0.0.5]", "10.0.0.5:8123", True),  # an IPv4 connection to a dual-stack socket
    ("[fe80::1]", "[fe80::1]:8123", True),
    ("10.0.0.5", "10.0.0.6:8123", False),
    ("10.0.0.5", "annotate.lan:8123", False),
])
def test_served_on_every_address_it_answers_to_the_one_a_request_came_in_on(collection, local, host, allowed):
    alice = collection.add_annotator("alice")
    client = TestClient(create_app(collection.path, host="::"), base_url=f"http://{local}:8123")
    assert (client.get(f"/api/{alice.token}/next", headers={"Host": host}).status_code == 200) == allowed


def test_a_live_server_checks_the_host_too(collection):
    """uvicorn, not the TestClient, says which address and port a connection came in on."""
    alice = collection.add_annotator("alice")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(collection.path), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        for host, status in ((f"localhost:{port}", 200), (f"attacker.example:{port}", 400), ("localhost:1", 400)):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", f"/api/{alice.token}/next", headers={"Host": host})
            assert connection.getresponse().status == status, host
            connection.close()
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_the_api_and_the_admin_page_are_never_cached(collection, client):
    alice = collection.add_annotator("alice")
    for path in (f"/api/{alice.token}/next", "/api/nope/next", f"/admin/{collection.admin_token}", "/admin/nope"):
        assert client.get(path).headers["cache-control"] == "no-store"
    response = client.post(f"/api/{alice.token}/verdict", json={})
    assert response.status_code == 400 and response.headers["cache-control"] == "no-store"


def assert_safe_headers(response):
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


def assert_no_inline_code(html: str):
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)  # only <script src=...>
    assert not re.search(r"<style|\sstyle=|\son[a-z]+=", html)


def test_pages_carry_a_strict_csp_and_no_inline_code(collection, client):
    alice = collection.add_annotator("alice")
    page = client.get(f"/a/{alice.token}")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert_safe_headers(page)
    assert_no_inline_code(page.text)
    for asset in re.findall(r'(?:src|href)="\.\./(static/[^"]+)"', page.text):
        response = client.get(f"/{asset}")
        assert response.status_code == 200
        assert_safe_headers(response)
    admin = client.get(f"/admin/{collection.admin_token}")
    assert_safe_headers(admin)
    assert_no_inline_code(admin.text)
    assert_safe_headers(client.get(f"/api/{alice.token}/next"))
    assert_safe_headers(client.get("/a/nope"))


def test_admin_page_shows_counts_progress_agreement_and_escapes_text(collection, client):
    collection.set_overlap(2)
    people = [collection.add_annotator(name) for name in ("<script>alert(1)</script>", "bob")]
    for who in people:
        pair = client.get(f"/api/{who.token}/next").json()
        client.post(f"/api/{who.token}/verdict", json=verdict(pair, "tie", f"s-{who.id}", seconds=3.0,
                                                             rationale='<script>alert("rationale")</script>'))
    judge = collection.add_annotator("judge-rm", kind="ai")
    collection.record_ai_verdicts(judge, [(p["pair_id"], "a", "") for p in collection.pairs()])

    page = client.get(f"/admin/{collection.admin_token}")
    assert page.status_code == 200
    html = page.text
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;script&gt;alert(&#34;rationale&#34;)&lt;/script&gt;" in html
    overview = dict(re.findall(r"<dt>([^<]+)</dt>\s*<dd>([^<]+)</dd>", html))
    assert overview == {"Prompts": "2", "Responses": "6", "Pairs": "6", "Verdicts": "8",
                        "Overlap (humans per pair)": "2", "Annotators": "3",
                        "Pairs with ≥ 2 human verdicts": "1", "Observed agreement": "100%",
                        "Krippendorff's α": "—", "Fleiss' κ (1 pair)": "—"}  # one shared tie: no variation
    assert f"http://testserver/a/{people[1].token}" in html
    assert html.count('<td class="num">1 / 6</td>') == 2  # each person judged one of six
    assert '<td class="num">0 / 0 / 1 / 0</td>' in html  # as shown: one tie
    assert '<td class="num">3.0</td>' in html  # median seconds
    assert "<td>judge-rm</td>" in html and '<td class="num">6 / 6</td>' in html
