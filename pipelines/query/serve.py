"""``tda serve RUN``: a long-running HTTP/JSON service over a finished run (FastAPI + uvicorn).

The run is loaded once (:class:`pipelines.query.state.Service`); then

- ``GET /health``: status, scorer, index kind, sizes, load time, whether the model is loaded;
- ``GET /query/{id}?k=10``: top-k proponents and opponents of stored query ``id``;
- ``POST /query`` ``{"ids": [...], "k": 10}``: the same for several stored queries, one search;
- ``POST /query/train`` ``{"ids": [...], "k": 10}``: training examples asked as queries;
- ``POST /query/input`` ``{"rows": [{...}], "k": 10}``: new inputs, rows with the query data's
  columns (MNIST: ``{"image": [784 uint8], "label": 7}``), featurized on the fly (the model is
  loaded on the first such request).

Each answer lists, per query, its id, label and ``label_name`` (the class name, where the run has
class names), its prediction (``predicted``, ``p_predicted``, ``predicted_name``; stored queries of
classifiers) and ``text`` (text data; cut at ``score.text_chars`` when set), and the proponents /
opponents with their ids, labels, names, scores and texts. A bad request (unknown id: the
detail lists ids that exist; k out of range, malformed body, a scorer that cannot score new
inputs) is a 4xx JSON ``{"error": type, "detail": message}``, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StrictInt

from tda.errors import InputChangedError, QueryError, TDAError

from pipelines.layout import RunPaths
from pipelines.query.lean import Answer
from pipelines.report import label_fields, label_name, text_fields
from pipelines.query.state import Service

logger = logging.getLogger(__name__)

#: most ids or rows one request may ask for
MAX_BATCH = 1024


#: default largest request body (bytes); ``tda serve --max-body-mb`` sets it
MAX_BODY = 16 << 20


class Ids(BaseModel):
    """Body of ``POST /query`` and ``POST /query/train``: integer ids (``5``, not ``"5"``, ``5.0`` or ``true``)."""

    ids: list[StrictInt] = Field(min_length=1, max_length=MAX_BATCH)
    k: StrictInt = 10


class Rows(BaseModel):
    """Body of ``POST /query/input``: rows with the query data's columns."""

    rows: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_BATCH)
    k: StrictInt = 10
    label: StrictInt | str | None = None  # the class explained for rows without a label (default: the predicted one)


class BodyTooLarge(Exception):
    """A request body over the server's limit."""


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before it is parsed
    (by its Content-Length, or as its chunks arrive), so a huge body never fills memory."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen, started = 0, False

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge
            return message

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps({"error": "BodyTooLarge", "detail": f"the request body is over {self.limit:,} bytes; send "
                           "fewer rows per request (or start tda serve with a larger --max-body-mb)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def answer_json(ans: Answer) -> dict[str, Any]:
    """The JSON of an answer: one entry per query (id, label and name, prediction, text, proponents
    and opponents)."""
    def side(row: int, name: str) -> list[dict[str, Any]]:
        ids, scores = ans.top[f"{name}_ids"][row], ans.top[f"{name}_scores"][row]
        return [ans.train_row(int(i), float(s)) for i, s in zip(ids, scores) if int(i) >= 0]

    results = []
    for r, q in enumerate(ans.ids):
        result: dict[str, Any] = {"id": int(q), **label_fields(_plain(ans.qlabels.get(int(q))), ans.names)}
        if ans.predicted and int(q) in ans.predicted:
            result["predicted"], result["p_predicted"] = ans.predicted[int(q)]
            result["predicted_name"] = label_name(result["predicted"], ans.names)
        result.update(text_fields((ans.qtexts or {}).get(int(q)), ans.chars))
        results.append({**result, "proponents": side(r, "proponent"), "opponents": side(r, "opponent")})
    return {"scorer": ans.scorer, "index": ans.kind, "search_ms": round(ans.search * 1000, 3), "results": results}


def _status(exc: TDAError) -> int:
    """404 for an id the run does not hold, 400 for another bad query (k), 503 once an input of the
    run changed under the server, 422 for bad input data."""
    if isinstance(exc, InputChangedError):
        return 503
    if isinstance(exc, QueryError):
        return 404 if "not in the" in str(exc) else 400
    return 422


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def create_app(service: Service, max_body: int = MAX_BODY) -> FastAPI:
    """The FastAPI application answering from ``service`` (request bodies up to ``max_body`` bytes)."""
    app = FastAPI(title="tda serve", description=__doc__)
    app.add_middleware(BodyLimit, limit=max_body)

    @app.exception_handler(TDAError)
    async def tda_error(request: Request, exc: TDAError) -> JSONResponse:
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=_status(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"error": "RequestValidationError", "detail": problems}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("tda serve: unexpected error")
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=500)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return service.health()

    @app.get("/query/{example}")
    def query_one(example: int, k: int = 10) -> dict[str, Any]:
        return answer_json(service.stored([example], k))

    @app.post("/query")
    def query(body: Ids) -> dict[str, Any]:
        return answer_json(service.stored(list(dict.fromkeys(body.ids)), body.k))

    @app.post("/query/train")
    def query_train(body: Ids) -> dict[str, Any]:
        return answer_json(service.train(list(dict.fromkeys(body.ids)), body.k))

    @app.post("/query/input")
    def query_input(body: Rows) -> dict[str, Any]:
        return answer_json(service.new_inputs(body.rows, body.k, body.label))

    return app


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    service = Service.load(RunPaths(Path(args.run).resolve()))
    service.threads = max(1, args.threads)
    health = service.health()
    print(f"tda serve: {health['run']} ({health['scorer']}, {health['index']} index over {health['n_train']} "
          f"training examples, {health['n_query']} stored queries; loaded in {health['load_s']:.2f}s) on "
          f"http://{args.host}:{args.port}", flush=True)
    max_body = int(getattr(args, "max_body_mb", MAX_BODY >> 20) * (1 << 20))
    uvicorn.run(create_app(service, max_body), host=args.host, port=args.port, log_level="warning")
    return 0
