"""What align's local web servers share (`align collect serve`, `align serve`): they answer only requests addressed to
this server by its own address in its Host header, so that a site an attacker points at this machine (DNS
rebinding) cannot read from or post to them."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


class AllowedHosts:
    """Answers 400 to a request whose Host header is not this server's own name and port (against DNS
    rebinding): a loopback name, the address it was asked to bind (`host`), or the address the connection
    came in on (an address, never a name an attacker controls: serving on 0.0.0.0, each network's own
    address works)."""

    def __init__(self, app: ASGIApp, host: str, hint: str):
        self.app, self.names, self.hint = app, {*LOOPBACK_NAMES, host.lower()}, hint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.allowed(scope):
            response = PlainTextResponse(f"This server answers only to its own address: {self.hint}.", 400)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def allowed(self, scope: Scope) -> bool:
        local, port = scope.get("server") or ("", None)
        local = str(local).lower().removeprefix("::ffff:")  # an IPv4 address, as a dual-stack socket gives it
        names = [_bracketed(name) for name in self.names | {local}]
        accepted = {f"{name}:{port}" for name in names}
        if port == 80:  # browsers leave the default port out
            accepted.update(names)
        return Headers(scope=scope).get("host", "").lower() in accepted


def _bracketed(address: str) -> str:
    """An address as a Host header writes it: an IPv6 one in brackets."""
    return f"[{address}]" if ":" in address else address
