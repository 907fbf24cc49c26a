"""``tda serve``: a real uvicorn on a loopback port answers stored ids, training ids, new inputs and bad requests."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipelines.cli.main import main
from pipelines.cli.query import full_answer
from pipelines.layout import RunPaths

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(default_tiny_run):  # the session's default tiny run (conftest), read only
    return default_tiny_run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(base: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def server(tiny_run):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli.main", "serve", str(tiny_run), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if _call(base, "/health")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"tda serve did not start: {proc.stdout.read() if proc.poll() is not None else ''}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_health(server):
    status, health = _call(server, "/health")
    assert status == 200 and health["status"] == "ok" and health["scorer"] == "trak"
    assert (health["n_train"], health["n_query"], health["loaded"]) == (300, 20, "lean")


def test_stored_ids_match_tda_query(server, tiny_run):
    status, got = _call(server, "/query", {"ids": [3, 1], "k": 4})
    want = full_answer(RunPaths(tiny_run), [3, 1], "query", 4)
    assert status == 200 and [r["id"] for r in got["results"]] == [3, 1]
    for row, result in enumerate(got["results"]):
        assert result["label"] == want.qlabels[result["id"]]
        assert [p["id"] for p in result["proponents"]] == want.top["proponent_ids"][row].tolist()
        assert [p["id"] for p in result["opponents"]] == want.top["opponent_ids"][row].tolist()
        assert all(p["label"] == want.labels[p["id"]] for p in result["proponents"])
    status, one = _call(server, "/query/3?k=4")
    assert status == 200 and one["results"][0] == got["results"][0]


def test_training_ids_as_queries(server, tiny_run):
    status, got = _call(server, "/query/train", {"ids": [0], "k": 2})
    want = full_answer(RunPaths(tiny_run), [0], "train", 2)
    assert status == 200 and [p["id"] for p in got["results"][0]["proponents"]] == want.top["proponent_ids"][0].tolist()


@pytest.mark.parametrize("path, body, status, error", [
    ("/query/999", None, 404, "not in the query split"),
    ("/query/1?k=0", None, 400, "k must be between 1"),
    ("/query", {"ids": [1], "k": 0}, 400, "k must be between 1"),
    ("/query", {"ids": [True]}, 422, "ids"),
    ("/query", {"ids": ["5"]}, 422, "ids"),
    ("/query", {"ids": [5.0]}, 422, "ids"),
    ("/query", {"ids": [1], "k": "3"}, 422, "k"),
    ("/query/abc", None, 422, "example"),
    ("/query", {"ids": "x"}, 422, "ids"),
    ("/query", {"ids": []}, 422, "ids"),
    ("/query/train", {"ids": [100000]}, 404, "not in the train split"),
    ("/query/input", {"rows": [{"img": [1]}]}, 422, "columns"),
    ("/nowhere", None, 404, ""),
])
def test_bad_requests_are_4xx_json(server, path, body, status, error):
    got_status, got = _call(server, path, body)
    assert got_status == status and error in json.dumps(got)


def test_new_input_matches_its_stored_query(server, tiny_run):
    from pipelines.run import datasets_for
    from pipelines.run_folder import recorded_config

    paths = RunPaths(tiny_run)
    row = datasets_for(recorded_config(paths), paths)["query"][2]
    status, got = _call(server, "/query/input", {"rows": [{"image": list(row["image"]), "label": row["label"]}], "k": 3})
    _, stored = _call(server, "/query/2?k=3")
    assert status == 200 and got["results"][0]["id"] == -1 and got["results"][0]["label"] == row["label"]
    for side in ("proponents", "opponents"):
        assert [p["id"] for p in got["results"][0][side]] == [p["id"] for p in stored["results"][0][side]]
    assert _call(server, "/health")[1]["model_loaded"]


def test_unknown_id_names_the_ids_that_exist(server, tiny_run):
    status, got = _call(server, "/query/999")
    assert status == 404 and ("query ids that exist: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ... (20 in all, ids 0..19; "
                              f"`tda query --run {tiny_run} --list` lists them)") in got["detail"]
    status, got = _call(server, "/query/3?k=2")
    assert status == 200 and got["results"][0]["label_name"] is None  # the demo data name no classes
    assert "predicted" in got["results"][0] and "text" not in got["results"][0]


def test_k_errors_over_http_name_the_field_not_the_cli_flag(server):
    status, got = _call(server, "/query/1?k=0")
    assert status == 400 and not got["detail"].startswith("-k")


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_413_before_it_is_parsed(declared):
    """The body limit answers 413 from the declared length, or as the chunks arrive, and never
    passes the body on."""
    import asyncio

    from pipelines.query.serve import BodyLimit

    reached = []

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        reached.append(True)

    chunks = [{"type": "http.request", "body": b"x" * 600, "more_body": True} for _ in range(3)]
    chunks.append({"type": "http.request", "body": b"", "more_body": False})
    headers = [(b"content-length", b"1800")] if declared else []
    sent = []

    async def receive():
        return chunks.pop(0)

    async def send(message):
        sent.append(message)

    asyncio.run(BodyLimit(app, limit=1000)({"type": "http", "headers": headers}, receive, send))
    assert sent[0]["status"] == 413 and b"over 1,000 bytes" in sent[1]["body"] and not reached
