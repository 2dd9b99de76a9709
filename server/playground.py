"""The playground (/playground): one static page, no build step, that streams a request with
`adasd.token_sources` and colours each token by where it came from. `/` links to it.

The files are package data (server/playground/); they are read once and served from memory with
a strict Content-Security-Policy (no inline script or style, requests to this origin only). The
page holds an API key only in its own memory: it never stores it.
"""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

ASSETS = Path(__file__).parent / "playground"
TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".js": "text/javascript; charset=utf-8"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@cache
def _asset(name: str) -> bytes | None:
    path = ASSETS / name
    if path.suffix not in TYPES or path.parent != ASSETS or not path.is_file():
        return None
    return path.read_bytes()


def _serve(name: str) -> Response:
    body = _asset(name)
    if body is None:
        raise HTTPException(status_code=404)  # the OpenAI-shaped "no route" answer
    return Response(body, media_type=TYPES[Path(name).suffix], headers=HEADERS)


@router.get("/")
async def index(raw_request: Request) -> HTMLResponse:
    model = html.escape(raw_request.app.state.settings.served_model_name)
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>adasd</title></head><body>'
            f'<h1>adasd</h1><p>An OpenAI-compatible server with adaptive speculative decoding, serving '
            f'<code>{model}</code>.</p><ul><li><a href="/playground">Playground</a>: see where each token '
            f'comes from</li><li><a href="/docs">API documentation</a></li><li><a href="/v1/models">/v1/models</a>'
            f'</li><li><a href="/ready">/ready</a></li><li><a href="/metrics">/metrics</a></li></ul></body></html>')
    return HTMLResponse(page, headers=HEADERS)


@router.get("/playground")
async def playground() -> Response:
    return _serve("index.html")


@router.get("/playground/{name}")
async def playground_asset(name: str) -> Response:
    return _serve(name)
