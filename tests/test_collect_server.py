"""The annotation server's HTTP surface, in-process through Starlette's TestClient."""

import re

import pytest
from starlette.testclient import TestClient

from align.collect.server import SECURITY_HEADERS, create_app
from align.collect.store import Candidates, Collection

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


def verdict(pair: dict, choice: str, submission: str, **extra) -> dict:
    return {"pair_id": pair["pair_id"], "left_id": pair["left"]["id"], "choice": choice, "submission": submission,
            **extra}


def test_next_and_verdict_round_trip(collection, client):
    alice = collection.add_annotator("alice")
    response = client.get(f"/api/{alice.token}/next")
    assert response.status_code == 200
    pair = response.json()
    assert set(pair) == {"pair_id", "prompt", "left", "right", "progress"}
    assert pair["progress"] == {"done": 0, "total": 6}
    assert "model-" not in response.text  # blind: no model names reach the page

    response = client.post(f"/api/{alice.token}/verdict",
                           json=verdict(pair, "left", "s-1", rationale="clearer", seconds=4.5))
    assert response.status_code == 200
    assert response.json()["repeated"] is False and response.json()["progress"] == {"done": 1, "total": 6}

    [stored] = collection.verdicts()
    a_id = next(p["a"]["id"] for p in collection.pairs() if p["pair_id"] == pair["pair_id"])
    assert stored["choice"] == ("a" if pair["left"]["id"] == a_id else "b")
    assert (stored["annotator"], stored["rationale"], stored["seconds"]) == ("alice", "clearer", 4.5)
    assert client.get(f"/api/{alice.token}/next").json()["pair_id"] != pair["pair_id"]


def test_the_same_submission_sent_twice_counts_once(collection, client):
    alice = collection.add_annotator("alice")
    pair = client.get(f"/api/{alice.token}/next").json()
    first = client.post(f"/api/{alice.token}/verdict", json=verdict(pair, "tie", "s-1")).json()
    again = client.post(f"/api/{alice.token}/verdict", json=verdict(pair, "tie", "s-1")).json()
    assert again == first | {"repeated": True}
    assert len(collection.verdicts()) == 1


def test_reload_gets_the_held_pair_and_done_when_nothing_is_left(collection, client):
    alice = collection.add_annotator("alice")
    pair = client.get(f"/api/{alice.token}/next").json()
    assert client.get(f"/api/{alice.token}/next").json() == pair  # same pair, same sides
    for n in range(6):
        client.post(f"/api/{alice.token}/verdict", json=verdict(pair, "right", f"s-{n}"))
        pair = client.get(f"/api/{alice.token}/next").json()
    assert pair == {"done": True, "progress": {"done": 6, "total": 6}}


@pytest.mark.parametrize("body, message", [
    (b"not json", "must be a JSON object"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"pair_id": 1, "left_id": 1, "choice": "left"}', "field 'submission' is missing"),
    (b'{"pair_id": "1", "left_id": 1, "choice": "left", "submission": "s"}', "field 'pair_id' must be an integer"),
    (b'{"pair_id": true, "left_id": 1, "choice": "left", "submission": "s"}', "field 'pair_id' must be an integer"),
    (b'{"pair_id": 1, "left_id": 1, "choice": "maybe", "submission": "s"}', "choice must be one of"),
    (b'{"pair_id": 1, "left_id": 1, "choice": "left", "submission": ""}', "a submission needs an id"),
    (b'{"pair_id": 1, "left_id": 1, "choice": "left", "submission": "s", "seconds": -1}', "'seconds' must be"),
    (b'{"pair_id": 1, "left_id": 1, "choice": "left", "submission": "s", "seconds": NaN}', "'seconds' must be"),
    (b'{"pair_id": 1, "left_id": 1, "choice": "left", "submission": "s", "rationale": 3}', "'rationale' must be"),
    (b'{"pair_id": 999, "left_id": 1, "choice": "left", "submission": "s"}', "no pair 999"),
])
def test_bad_verdicts_get_400_with_a_message(collection, client, body, message):
    alice = collection.add_annotator("alice")
    response = client.post(f"/api/{alice.token}/verdict", content=body)
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert collection.verdicts() == []


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
    assert client.post(f"/api/{alice.token}/verdict", content=b" " * 100_000).status_code == 413


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
