"""The annotation server: a page per annotator (`/a/{token}`) that shows pairs and takes verdicts through a
small JSON API (`/api/{token}/...`), and an admin page (`/admin/{admin_token}`) with progress and agreement.

Tokens in URLs are the only credentials, so no response hands them on in a Referer header, lets another
site frame a page, or stays in a cache (`no-store` on the API and the admin page). A request must name
this server by its own address in its Host header, so that a site an attacker points at this machine (DNS
rebinding) cannot use a visitor's browser to read or post. Prompts and responses are untrusted text: the
page inserts them as text only, and a strict Content-Security-Policy (no inline code, nothing from
elsewhere) would stop any that slipped into markup from running.

Annotators are untrusted too. The page names its task by an opaque handle and sees only texts, never an id
(ids follow the models), and a verdict counts only for an open assignment of its annotator, on the side
the assignment showed on the left (the store checks; the body cannot claim a side). A body the API cannot
take is answered 4xx with a message, never 5xx, which the page would retry. Durability lives in the
store: a verdict is acknowledged only once it is committed, and a submission sent again gets its first
verdict back, so the page may resend until it hears back.

Run it with `serve()` (what `align collect serve` does) or `python -m align.collect.server COLLECTION`.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

import uvicorn
from jinja2 import Environment, FileSystemLoader
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from align.annotation.store import Annotator, Collection
from align.collect.agreement import summarize
from align.errors import AlignError
from align.web import AllowedHosts

STATIC = Path(__file__).parent / "static"
MAX_BODY = 64 * 1024  # a verdict is a few hundred bytes; the store keeps 2,000 characters of rationale
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PRIVATE_PATHS = ("/api/", "/admin/")  # what they answer names tokens, verdicts or tasks: never cached
UNKNOWN_LINK = "This annotation link is not valid (any more). Ask the person who sent it for a new one."
NOT_YOURS = "This pair is not (or no longer) yours to judge. Reload the page to get your next one."
SERVER_FAILED = "The server failed to answer; the page tries again. If it keeps failing, tell the organiser."
VERDICT_FIELDS = ("handle", "choice", "submission", "rationale", "seconds")
SHOWN = ("left", "right", "tie", "both_bad")

_templates = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True)


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response (pages, JSON, static files and errors, 5xx included: it wraps
    the whole app), and `Cache-Control: no-store` under PRIVATE_PATHS."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.update(SECURITY_HEADERS)
                if scope["path"].startswith(PRIVATE_PATHS):
                    headers["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


def create_app(collection_path: str | Path, host: str = "127.0.0.1") -> ASGIApp:
    """The web app for the collection at `collection_path` (an AlignError where there is none), answering to
    requests for `host`, the address it is served on, and this machine's loopback names."""
    collection = Collection.open(collection_path)

    def annotator(request: Request) -> Annotator | None:
        """The human annotator whose token is in the URL. AI judges have tokens too but record through
        `align collect judge`, which replaces all their verdicts, so none of theirs may come from the page."""
        who = collection.annotator(request.path_params["token"])
        return who if who is not None and who.kind == "human" else None

    def annotate(request: Request) -> Response:
        if annotator(request) is None:
            return _error_page(request, "Link not valid", UNKNOWN_LINK, 404)
        return FileResponse(STATIC / "annotate.html", media_type="text/html")

    def next_pair(request: Request) -> Response:
        who = annotator(request)
        if who is None:
            return JSONResponse({"error": UNKNOWN_LINK}, 404)
        task = collection.next_pair(who)
        return JSONResponse(_task_view(task) if task else {"done": True, "progress": collection.progress(who)})

    async def verdict(request: Request) -> Response:
        # JSON only: a cross-site form or a "simple" fetch cannot send this type without asking first (CORS)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return JSONResponse({"error": "a verdict is sent as JSON (Content-Type: application/json)"}, 415)
        body = await request.body()
        return await run_in_threadpool(record, request, body)

    def record(request: Request, body: bytes) -> Response:
        who = annotator(request)
        if who is None:
            return JSONResponse({"error": UNKNOWN_LINK}, 404)
        try:
            fields = _verdict_fields(body)
            assigned = collection.assigned(who, fields.pop("handle"))
            if assigned is None:
                raise AlignError(NOT_YOURS)
            result = collection.submit(who, *assigned, **fields)
        except AlignError as err:
            return JSONResponse({"error": str(err)}, 400)
        return JSONResponse({"repeated": result["repeated"], "progress": result["progress"]})

    def admin(request: Request) -> Response:
        if not secrets.compare_digest(request.path_params["token"].encode(), collection.admin_token.encode()):
            return _error_page(request, "Not found", "There is no page here.", 404)
        html = _templates.get_template("admin.html").render(stylesheet=_stylesheet(request),
                                                           **_admin_view(collection, request))
        return HTMLResponse(html)

    routes = [
        Route("/a/{token}", annotate, name="annotate"),
        Route("/api/{token}/next", next_pair),
        Route("/api/{token}/verdict", verdict, methods=["POST"], max_body_size=MAX_BODY),
        Route("/admin/{token}", admin),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _server_error})
    return SecurityHeaders(AllowedHosts(app, host, "open the link that `align collect serve` printed"))


def serve(collection_path: str | Path, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False) -> None:
    """Serve the collection in this process until interrupted. Prints nothing itself: uvicorn logs its
    start, its errors and, unless `quiet`, a line per request."""
    config = uvicorn.Config(create_app(collection_path, host), host=host, port=port, access_log=not quiet,
                            server_header=False)
    uvicorn.Server(config).run()


def _task_view(task: dict) -> dict:
    """What the page sees of a task: its handle, the texts in the order shown, and the progress."""
    return {"handle": task["handle"], "prompt": task["prompt"], "left": task["left"]["text"],
            "right": task["right"]["text"], "progress": task["progress"]}


def _verdict_fields(body: bytes) -> dict:
    """`handle` and the keyword arguments of `Collection.submit` in a verdict's JSON body; an AlignError that
    names what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # bad JSON and bad UTF-8 alike; nesting deeper than Python recurses
        data = None
    if not isinstance(data, dict):
        raise AlignError('the body must be a JSON object: {"handle", "choice", "submission", '
                         '"rationale" (optional), "seconds" (optional)}')
    if unknown := sorted(set(data) - set(VERDICT_FIELDS)):  # a claimed side or pair id, say: refused, not ignored
        raise AlignError(f"unknown field '{unknown[0]}': a verdict has only {', '.join(VERDICT_FIELDS)}")
    for field in ("handle", "choice", "submission"):
        if field not in data:
            raise AlignError(f"field '{field}' is missing")
    return {"handle": _text(data, "handle"), "choice": _text(data, "choice"),
            "submission": _text(data, "submission"), "rationale": _text(data, "rationale", default=""),
            "seconds": _seconds(data.get("seconds"))}


def _text(data: dict, field: str, default: str | None = None) -> str:
    value = default if data.get(field) is None else data[field]
    if not isinstance(value, str):
        raise AlignError(f"field '{field}' must be a string, got {_brief(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON can spell a lone surrogate ("\ud800"), which no file can store
        raise AlignError(f"field '{field}' is not valid text (it has a lone surrogate)") from None
    return value


def _seconds(value) -> float | None:
    # the upper bound keeps a huge integer from overflowing the float it is stored as
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not 0 <= value <= sys.float_info.max):
        raise AlignError(f"field 'seconds' must be a number >= 0, got {_brief(value)}")
    return None if value is None else float(value)


def _brief(value) -> str:
    """A value for an error message: short, and never walked into (it may nest as deep as Python can go)."""
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "an array"
    shown = json.dumps(value)
    return shown if len(shown) <= 40 else shown[:40] + "…"


def _admin_view(collection: Collection, request: Request) -> dict:
    verdicts = collection.verdicts()
    counts = collection.counts()
    a_of = {p["pair_id"]: p["a"]["id"] for p in collection.pairs()}
    by_annotator = defaultdict(list)
    for v in verdicts:
        by_annotator[v["annotator"]].append(v)
    annotators = []
    for who in collection.annotators():
        given = by_annotator[who.name]
        # AI judges take every pair; only humans are assigned pairs up to the overlap
        progress = collection.progress(who) if who.kind == "human" else {"done": len(given), "total": len(a_of)}
        shown = Counter(_shown_choice(v, a_of[v["pair_id"]]) for v in given)
        seconds = [v["seconds"] for v in given if v["seconds"] is not None]
        annotators.append({
            "name": who.name, "kind": who.kind, **progress,
            "last": max((v["created"] for v in given), default="").replace("T", " ").removesuffix("+00:00"),
            "choices": [shown[c] for c in SHOWN],
            "median_seconds": statistics.median(seconds) if seconds else None,
            "link": str(request.url_for("annotate", token=who.token)) if who.kind == "human" else None,
        })
    overview = [("Prompts", counts["prompts"]), ("Responses", counts["responses"]), ("Pairs", counts["pairs"]),
                ("Verdicts", counts["current_verdicts"]), ("Overlap (humans per pair)", collection.overlap),
                ("Annotators", counts["annotators"])]
    agreement = summarize(verdicts)
    latest = [v for v in reversed(verdicts) if v["rationale"] and v["kind"] == "human"][:20]  # AI: reward numbers
    return {"name": collection.path.name, "path": str(collection.path), "overview": overview,
            "annotators": annotators, "humans": agreement["humans"], "ai": agreement["ai"],
            "rationales": [v | {"choice": _shown_choice(v, a_of[v["pair_id"]])} for v in latest]}


def _shown_choice(verdict: dict, a_id: int) -> str:
    """A stored choice (a/b) as the annotator saw it (left/right)."""
    if verdict["choice"] in ("tie", "both_bad"):
        return verdict["choice"]
    return "left" if (verdict["choice"] == "a") == (verdict["left_id"] == a_id) else "right"


def _stylesheet(request: Request) -> str:
    return str(request.url_for("static", path="style.css"))


def _error_page(request: Request, heading: str, message: str, status: int) -> HTMLResponse:
    html = _templates.get_template("error.html").render(stylesheet=_stylesheet(request), heading=heading,
                                                       message=message)
    return HTMLResponse(html, status)


def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own errors (no such route, wrong method): JSON for the API, a page otherwise."""
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)
    return _error_page(request, exc.detail, "Check the link you followed.", exc.status_code)


def _server_error(request: Request, exc: Exception) -> Response:
    """A bug or a failing disk: a message, never the traceback (uvicorn logs that for whoever serves)."""
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": SERVER_FAILED}, 500)
    return _error_page(request, "Server error", SERVER_FAILED, 500)


def main() -> None:
    """Serve a collection without the rest of the CLI (the fault tests start it so)."""
    parser = argparse.ArgumentParser(prog="python -m align.collect.server", description="Serve a collection "
                                     "to annotators (`align collect serve` adds annotators and prints links).")
    parser.add_argument("collection")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--access-log", action="store_true")
    args = parser.parse_args()
    try:
        serve(args.collection, args.host, args.port, quiet=not args.access_log)
    except AlignError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
