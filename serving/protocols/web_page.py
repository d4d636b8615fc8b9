"""The web page (`serving/web/`): its three static files, served at `/` by the HTTP edge.

The page is a client like any other: it calls only the public REST routes, with the user's token where
the server asks for one. Its files need no token (they hold nothing of the server's), and a strict
Content-Security-Policy keeps it to this origin: no script, style or font from anywhere else.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serving.core.errors import shown
from serving.protocols.http_edge import Call, HttpEdge, error_response

FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def page_files() -> dict[str, bytes]:
    folder = resources.files("serving") / "web"
    return {name: (folder / name).read_bytes() for name in FILES}


def routes(edge: HttpEdge) -> list[Route]:
    files = page_files()  # read once: three small files

    def answer(name: str) -> Response:
        headers = {"content-security-policy": POLICY, "x-content-type-options": "nosniff"}
        return Response(files[name], media_type=FILES[name], headers=headers)

    async def index(request: Request, call: Call) -> Response:
        return answer("index.html")

    async def asset(request: Request, call: Call) -> Response:
        name = request.path_params["name"]
        if name not in files or name == "index.html":
            return error_response(404, f"the page has no file {shown(name)}")
        return answer(name)

    return [
        Route("/", edge.route(index, open_route=True), methods=["GET"]),
        Route("/web/{name}", edge.route(asset, open_route=True), methods=["GET"]),
    ]
