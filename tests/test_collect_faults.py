"""The annotation server SIGKILLed and restarted while annotators submit: every acknowledged verdict
survives, none is doubled, and every pair ends with exactly `overlap` verdicts; and where they also forge,
replay and send garbage, no forged verdict is stored and no answer is a 5xx.

Each client does what the page does: ask for its task, make a submission id once per verdict, and send it
again (the same id) until the server answers 200."""

import http.client
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from align.annotation.store import Candidates, Collection

CLIENTS, OVERLAP, KILLS = 20, 4, 3
PROMPTS, RESPONSES = 25, 5  # 10 pairs a prompt: 250 pairs, 1,000 verdicts at overlap 4
KILL_AFTER = (150, 400, 650)  # acknowledged verdicts before each kill
DEADLINE_S = 80
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free port below the ephemeral range. While the server is down, a client's connect() to a port in
    that range may be given the same port as its own and connect to itself (TCP simultaneous open); that
    socket would then hold the port and the restarted server could not bind it."""
    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ranges.read_text().split()[0]) if ranges.exists() else 49152  # elsewhere: the IANA range
    for port in random.sample(range(max(1024, low - 10000), low), 100):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


class Server:
    """`python -m align.collect.server` as a process of its own, always on the same port."""

    def __init__(self, collection: Path, port: int, log: Path):
        self.cmd = [sys.executable, "-m", "align.collect.server", str(collection), "--port", str(port)]
        self.port, self.log = port, log
        self.proc = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=log,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 15
        while True:
            assert self.proc.poll() is None, f"the server exited: {self.log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the server did not start listening in 15 s"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Shared:
    """What the clients and the killer see of each other, under one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.kills = 0
        self.acked = {}  # submission -> (annotator_id, left text, right text, shown choice)
        self.posts_in_flight = 0
        self.cut_posts = Counter()  # kills so far -> POSTs whose connection broke mid-request
        self.failed_clients = Counter()  # kills so far -> clients with a failed request (then retried)


class Client(threading.Thread):
    def __init__(self, who, port: int, shared: Shared, deadline: float):
        super().__init__(daemon=True)
        self.who, self.port, self.shared, self.deadline = who, port, shared, deadline
        self.rng = random.Random(who.id)
        self.failed_since = set()  # kill counts at which this client already counted as failing
        self.error = None

    def run(self):
        try:
            while not (task := self.call("GET", "next")).get("done"):
                choice = self.rng.choice(("left", "right", "tie", "both_bad"))
                body = {"handle": task["handle"], "choice": choice, "submission": str(uuid.uuid4()), "seconds": 1.0}
                self.call("POST", "verdict", body)
                with self.shared.lock:
                    self.shared.acked[body["submission"]] = (self.who.id, task["left"], task["right"], choice)
        except Exception as err:  # reported by the test, which would otherwise see only a missing verdict
            self.error = err

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        """The JSON of a 200 answer, asking again (same request, same submission id) until there is one."""
        payload = json.dumps(body).encode() if body is not None else None
        while time.monotonic() < self.deadline:
            # A killed server resets its connections at once, so the timeout only has to outlast a busy one: 20
            # clients and a write (with fsync) per request on 2 loaded cores can take seconds. 5 s was not enough.
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            self.count_in_flight(method, +1)
            try:
                connection.request(method, f"/api/{self.who.token}/{path}", body=payload,
                                   headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                data = response.read()
            except ConnectionRefusedError:  # the server is down: nothing was sent
                self.failed(cut=False)
            except (OSError, http.client.HTTPException):  # sent, and the connection broke before the answer
                self.failed(cut=method == "POST")
            else:
                if response.status == 200:
                    return json.loads(data)
                assert response.status >= 500, f"{method} {path}: {response.status} {data!r}"
                self.failed(cut=False)
            finally:
                self.count_in_flight(method, -1)
                connection.close()
            time.sleep(0.05)
        raise TimeoutError(f"{self.who.name}: no answer to {method} {path} before the deadline")

    def count_in_flight(self, method: str, step: int) -> None:
        if method == "POST":
            with self.shared.lock:
                self.shared.posts_in_flight += step

    def failed(self, cut: bool) -> None:
        with self.shared.lock:
            kills = self.shared.kills
            self.shared.cut_posts[kills] += cut
            if kills not in self.failed_since:
                self.failed_since.add(kills)
                self.shared.failed_clients[kills] += 1


def _collection(tmp_path, prompts: int, responses: int, overlap: int, annotators: int):
    """A collection of every pair of `responses` answers to each of `prompts` prompts, and its annotators."""
    collection = Collection.create(tmp_path / "prefs.sqlite")
    collection.add([Candidates([{"role": "user", "content": f"prompt {i}"}],
                               [(f"response {i}.{j}", f"model-{j}") for j in range(responses)])
                    for i in range(prompts)])
    collection.set_overlap(overlap)
    return collection, [collection.add_annotator(f"person-{n}") for n in range(annotators)]


def _kill_and_restart(server, clients, thresholds, kill_now, deadline: float) -> None:
    """Start the clients; at each threshold, once `kill_now(threshold)`, SIGKILL the server and restart it on the same
    port a moment later; then wait for the clients until `deadline` (monotonic) and stop the server."""
    for client in clients:
        client.start()
    try:
        for threshold in thresholds:
            while not kill_now(threshold):
                assert [(c.who.name, c.error) for c in clients if c.error] == []  # fail now, not at the deadline
                assert time.monotonic() < deadline, f"kill at {threshold} verdicts never came"
                time.sleep(0.001)
            server.kill()
            time.sleep(0.3)  # down for a moment: clients meet refused connections too
            server.start()
        for client in clients:
            client.join(max(0.0, deadline - time.monotonic()))
    finally:
        server.stop()


@pytest.mark.timeout(90)
def test_verdicts_survive_a_killed_server(tmp_path):
    started = time.monotonic()
    collection, people = _collection(tmp_path, PROMPTS, RESPONSES, OVERLAP, CLIENTS)
    pairs = {p["pair_id"]: p for p in collection.pairs()}
    assert len(pairs) * OVERLAP == 1000

    server = Server(collection.path, free_port(), tmp_path / "server.log")
    server.start()
    shared = Shared()
    clients = [Client(who, server.port, shared, started + DEADLINE_S) for who in people]

    def kill_now(threshold: int) -> bool:  # once enough verdicts are in and submissions are on the wire
        with shared.lock:
            if len(shared.acked) < threshold or shared.posts_in_flight < 2:
                return False
            shared.kills += 1  # counted before the kill: the clients tell which kill cut their submission
            return True

    _kill_and_restart(server, clients, KILL_AFTER, kill_now, started + DEADLINE_S)
    assert [(c.who.name, c.error) for c in clients if c.error or c.is_alive()] == []

    for kill in range(1, KILLS + 1):
        assert shared.cut_posts[kill] > 0, f"kill {kill} cut no submission in flight"
        assert shared.failed_clients[kill] > 0
    assert shared.cut_posts[0] == shared.failed_clients[0] == 0  # no failure before the first kill

    with collection.reading() as db:
        rows = db.execute("SELECT submission, annotator_id, pair_id, left_id, choice FROM verdicts").fetchall()
    stored = Counter(row["submission"] for row in rows)
    assert [s for s, n in stored.items() if n > 1] == []
    assert set(stored) == set(shared.acked)  # every acknowledged verdict is there, and only those
    assert len(rows) == 1000
    assert set(Counter((row["pair_id"], row["annotator_id"]) for row in rows).values()) == {1}
    assert Counter(row["pair_id"] for row in rows) == {pair_id: OVERLAP for pair_id in pairs}
    assert_stored_as_shown(rows, shared.acked, pairs)


def assert_stored_as_shown(rows, acked: dict, pairs: dict) -> None:
    """Each stored verdict is on the pair whose texts its annotator saw, with the side they saw on the left and
    their choice in the pair's terms."""
    by_texts = {frozenset((p["a"]["text"], p["b"]["text"])): p for p in pairs.values()}
    for row in rows:
        annotator_id, left, right, shown = acked[row["submission"]]
        pair = by_texts[frozenset((left, right))]
        left_is_a = pair["a"]["text"] == left
        left_id = pair["a"]["id"] if left_is_a else pair["b"]["id"]
        expected = shown if shown in ("tie", "both_bad") else "a" if (shown == "left") == left_is_a else "b"
        assert (row["annotator_id"], row["pair_id"], row["left_id"], row["choice"]) == \
            (annotator_id, pair["pair_id"], left_id, expected)


FORGERS, FORGERY_OVERLAP = 10, 3
FORGERY_PROMPTS, FORGERY_RESPONSES = 12, 4  # 6 pairs a prompt: 72 pairs, 216 verdicts at overlap 3
FORGERY_KILL_AFTER = (60, 140)  # acknowledged verdicts before each kill
FORGERY_DEADLINE_S = 50
JSON = {"Content-Type": "application/json"}


class Ledger:
    """What the forging clients and the killer see of each other, under one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.kills = 0
        self.acked = {}  # submission -> (annotator_id, left text, right text, shown choice)
        self.tasks = []  # (annotator_id, handle, pair_id) of every task given out
        self.sent = []  # (annotator_id, body) of every acknowledged verdict, for others to replay
        self.judged = []  # (handle, pair_id) of judged tasks
        self.down = Counter()  # kills so far -> requests that met no server
        self.handled = Counter()  # forgery kind -> answers as they should be (4xx; a repeat for a replay)
        self.wrong = []  # (kind, status, answer) of forgeries answered otherwise
        self.server_errors = []  # (method, path, status, answer) of every 5xx


class Forger(threading.Thread):
    """An annotator who judges their tasks as the page does and, before each verdict, tries one of KINDS:
    another's handle; pair ids in place of a handle; a new verdict on a judged task (on a pair that reached
    its overlap, where one has); a claimed left side; another's acknowledged verdict sent again; their own
    sent again (the one kind that must be answered, as a repeat); and bodies that are malformed or not typed
    as JSON."""

    KINDS = ("stolen_handle", "pair_ids", "finished_pair", "claimed_left", "others_replay", "own_replay",
             "deep_json", "lone_surrogate", "not_json_typed", "huge_seconds")

    def __init__(self, who, port: int, ledger: Ledger, deadline: float, pairs: dict):
        super().__init__(daemon=True)
        self.who, self.port, self.ledger, self.deadline, self.pairs = who, port, ledger, deadline, pairs
        self.by_texts = {frozenset((p["a"]["text"], p["b"]["text"])): p for p in pairs.values()}
        self.rng = random.Random(who.id)
        self.last_body = None
        self.error = None

    def run(self):
        try:
            for turn in itertools.count():
                task = self.call("GET", "next")
                if task.get("done"):
                    return
                pair = self.by_texts[frozenset((task["left"], task["right"]))]
                with self.ledger.lock:
                    self.ledger.tasks.append((self.who.id, task["handle"], pair["pair_id"]))
                self.forge(self.KINDS[(turn + self.who.id) % len(self.KINDS)], task, pair)
                self.judge(task, pair)
        except Exception as err:  # reported by the test, which would otherwise see only a missing verdict
            self.error = err

    def judge(self, task: dict, pair: dict) -> None:
        choice = self.rng.choice(("left", "right", "tie", "both_bad"))
        body = {"handle": task["handle"], "choice": choice, "submission": str(uuid.uuid4()), "seconds": 1.0}
        self.call("POST", "verdict", body)
        with self.ledger.lock:
            self.ledger.acked[body["submission"]] = (self.who.id, task["left"], task["right"], choice)
            self.ledger.sent.append((self.who.id, body))
            self.ledger.judged.append((task["handle"], pair["pair_id"]))
        self.last_body = body

    def forge(self, kind: str, task: dict, pair: dict) -> None:
        made = self.forgery(kind, task, pair)
        if made is None:  # nothing to forge from yet
            return
        payload, headers = made
        answer = self.send("POST", "verdict", payload, headers)
        if answer is None:
            return
        status, data = answer
        if kind == "own_replay":
            right = status == 200 and json.loads(data)["repeated"]
        else:
            right = status == (415 if kind == "not_json_typed" else 400)
        with self.ledger.lock:
            if right:
                self.ledger.handled[kind] += 1
            elif status < 500:  # a 5xx is counted by send
                self.ledger.wrong.append((kind, status, data))

    def forgery(self, kind: str, task: dict, pair: dict) -> tuple[bytes, dict] | None:
        forged = f"forged-{uuid.uuid4()}"
        mine = {"handle": task["handle"], "choice": "left", "submission": forged}
        with self.ledger.lock:
            others = [t for t in self.ledger.tasks if t[0] != self.who.id]
            verdicts = Counter(pair_id for _, pair_id in self.ledger.judged)
            finished = [handle for handle, pair_id in self.ledger.judged if verdicts[pair_id] >= FORGERY_OVERLAP]
            finished = finished or [handle for handle, _ in self.ledger.judged]
            others_sent = [body for who, body in self.ledger.sent if who != self.who.id]
        if kind == "stolen_handle" and others:
            return json.dumps(mine | {"handle": self.rng.choice(others)[1]}).encode(), JSON
        if kind == "pair_ids" and others:
            pair_id = self.rng.choice(others)[2]
            body = {"pair_id": pair_id, "left_id": self.pairs[pair_id]["a"]["id"], "choice": "left",
                    "submission": forged}
            return json.dumps(body).encode(), JSON
        if kind == "finished_pair" and finished:
            return json.dumps(mine | {"handle": self.rng.choice(finished)}).encode(), JSON
        if kind == "claimed_left":
            return json.dumps(mine | {"left_id": pair["b"]["id"]}).encode(), JSON
        if kind == "others_replay" and others_sent:
            return json.dumps(self.rng.choice(others_sent)).encode(), JSON
        if kind == "own_replay" and self.last_body:
            return json.dumps(self.last_body).encode(), JSON
        if kind == "deep_json":
            return b'{"handle": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", JSON
        if kind == "lone_surrogate":
            return json.dumps(mine | {"rationale": "\ud800"}).encode(), JSON
        if kind == "not_json_typed":
            return json.dumps(mine).encode(), {"Content-Type": "text/plain"}
        if kind == "huge_seconds":
            return json.dumps(mine | {"seconds": 10 ** 400}).encode(), JSON
        return None

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        """The JSON of a 200 answer, asking again (same request, same submission id) until there is one."""
        payload = json.dumps(body).encode() if body is not None else None
        while time.monotonic() < self.deadline:
            answer = self.send(method, path, payload, JSON)
            if answer is not None and answer[0] == 200:
                return json.loads(answer[1])
            assert answer is None or answer[0] >= 500, f"{method} {path}: {answer}"
            time.sleep(0.05)
        raise TimeoutError(f"{self.who.name}: no answer to {method} {path} before the deadline")

    def send(self, method: str, path: str, payload: bytes | None, headers: dict) -> tuple[int, bytes] | None:
        """One request: the answer's status and body, or None where the server was down or died meanwhile."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, f"/api/{self.who.token}/{path}", body=payload, headers=headers)
            response = connection.getresponse()
            status, data = response.status, response.read()
        except (OSError, http.client.HTTPException):
            with self.ledger.lock:
                self.ledger.down[self.ledger.kills] += 1
            return None
        finally:
            connection.close()
        if status >= 500:
            with self.ledger.lock:
                self.ledger.server_errors.append((method, path, status, data))
        return status, data


@pytest.mark.timeout(60)
def test_forgeries_and_garbage_against_a_killed_server(tmp_path):
    started = time.monotonic()
    collection, people = _collection(tmp_path, FORGERY_PROMPTS, FORGERY_RESPONSES, FORGERY_OVERLAP, FORGERS)
    pairs = {p["pair_id"]: p for p in collection.pairs()}

    server = Server(collection.path, free_port(), tmp_path / "server.log")
    server.start()
    ledger = Ledger()
    clients = [Forger(who, server.port, ledger, started + FORGERY_DEADLINE_S, pairs) for who in people]

    def kill_now(threshold: int) -> bool:
        with ledger.lock:
            if len(ledger.acked) < threshold:
                return False
            ledger.kills += 1
            return True

    _kill_and_restart(server, clients, FORGERY_KILL_AFTER, kill_now, started + FORGERY_DEADLINE_S)
    assert [(c.who.name, c.error) for c in clients if c.error or c.is_alive()] == []
    assert ledger.server_errors == [] and ledger.wrong == []
    assert set(ledger.handled) == set(Forger.KINDS)  # every kind was tried, and answered as it should be
    assert all(ledger.down[kill] > 0 for kill in range(1, len(FORGERY_KILL_AFTER) + 1))  # the kills hit traffic

    with collection.reading() as db:
        rows = db.execute("SELECT submission, annotator_id, pair_id, left_id, choice FROM verdicts").fetchall()
    stored = Counter(row["submission"] for row in rows)
    assert [s for s, n in stored.items() if n > 1] == []
    assert set(stored) == set(ledger.acked)  # every acknowledged verdict, and no forged one
    assert Counter(row["pair_id"] for row in rows) == {pair_id: FORGERY_OVERLAP for pair_id in pairs}
    assert set(Counter((row["pair_id"], row["annotator_id"]) for row in rows).values()) == {1}
    assert_stored_as_shown(rows, ledger.acked, pairs)
