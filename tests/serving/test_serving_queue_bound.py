"""A flood of requests cannot queue the embedded server to death (issue 18): beyond ``--max-queued``
requests waiting for the model, a request is answered 429 with ``Retry-After`` at once (before its
body is read when the queue is already full); admitted requests complete as if alone; ``/health``
and ``/v1/models`` answer throughout and ``/health`` reports the queue; the process stays up. And
``--threads`` reaches the thread torch generates on. Real sockets, a real ``tracelearn serve``
process and the tiny random model; the queue's accounting is checked on its own first.
"""

import asyncio
import gc
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tracelearn.processes import ChildProcess, console_script, free_port, start_child
from tracelearn.serving.engine import GenerationEngine
from tracelearn.serving.engine_queue import AdmissionQueue, QueueDepth, QueueFullError
from tracelearn.serving.http_server import BackgroundServer
from tracelearn.serving.openai_api import create_app

SERVED = "tiny-chat"
MAX_QUEUED = 4
MAX_QUEUED_TOKENS = 100_000  # above anything these tests queue: only reported, never reached
THREADS = torch.get_num_threads() + 1  # not torch's own default: only --threads can make the worker see it
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 3 plus 4?"}]
GREEDY = {"model": SERVED, "messages": MESSAGES, "max_tokens": 40, "temperature": 0, "return_token_ids": True}
# Seeded sampling from random weights rarely meets an end-of-turn token: each choice runs its 400 tokens.
LONG = {"model": SERVED, "messages": MESSAGES, "max_tokens": 400, "temperature": 1.0, "seed": 7}


# --- the queue's accounting ---------------------------------------------------------------------------


def test_a_request_holds_its_place_until_its_last_choice_joins_the_batch() -> None:
    queue = AdmissionQueue(max_requests=2)
    first = queue.enter()
    first.hold(3, 100)
    assert (queue.depth().requests, queue.depth().tokens) == (1, 300)
    first.hold(3, 40)  # the budget as planned: the context left capped it
    first.choice_admitted()
    assert (queue.depth().requests, queue.depth().tokens) == (1, 80)
    second = queue.enter()
    with pytest.raises(QueueFullError) as full:
        queue.enter()
    assert full.value.status_code == 429 and full.value.retry_after_s == 1
    assert full.value.body()["error"]["type"] == "requests"
    assert full.value.body()["error"]["code"] == "rate_limit_exceeded"
    assert "2 requests are already waiting" in full.value.message and "(--max-queued) is 2" in full.value.message
    with pytest.raises(QueueFullError):
        queue.check_room()
    first.choice_admitted()
    first.choice_admitted()
    assert (queue.depth().requests, queue.depth().tokens) == (1, 0)  # all its choices run: it left
    first.choice_admitted()  # a late call changes nothing
    second.leave()
    second.leave()
    assert queue.depth() == QueueDepth(requests=0, tokens=0, max_requests=2, max_tokens=None, refused=2)


def test_the_token_bound_refuses_growth_beyond_it_but_never_a_request_alone() -> None:
    queue = AdmissionQueue(max_requests=10, max_tokens=1000)
    alone = queue.enter()
    alone.hold(4, 400)  # 1600 > 1000, but nothing else is queued: refusing it would refuse it forever
    other = queue.enter()
    with pytest.raises(QueueFullError) as full:
        other.hold(1, 10)
    assert full.value.body()["error"]["type"] == "tokens"
    assert "1600 tokens" in full.value.message and "limit of 1000 queued tokens" in full.value.message
    other.leave()
    alone.hold(4, 100)  # lowering never refuses
    fits = queue.enter()
    fits.hold(6, 100)
    assert queue.depth().tokens == 1000 and queue.depth().refused == 1


def test_a_dropped_request_gives_its_place_back() -> None:
    queue = AdmissionQueue(max_requests=1)
    queued = queue.enter()
    queued.hold(2, 50)
    del queued  # a streaming body that was never iterated is dropped, not closed
    gc.collect()
    assert (queue.depth().requests, queue.depth().tokens) == (0, 0)
    queue.enter().leave()


def test_the_token_bound_over_http(engine: GenerationEngine) -> None:
    """A request that would push the queued tokens past the bound is a 429 of type ``tokens``."""
    admission = AdmissionQueue(max_requests=64, max_tokens=2000)
    with BackgroundServer(create_app(engine, SERVED, admission=admission)) as server:
        # 16 choices of 300 tokens on an engine of 8 rows: 8 of them wait, holding 2400 queued tokens.
        holder = _raw_request(server.host, server.port, {**LONG, "n": 16, "max_tokens": 300})
        try:
            _wait_for(lambda: admission.depth().tokens > 2000, "the holder's waiting choices are queued")
            refused = httpx.post(f"{server.base_url}/chat/completions", json={**GREEDY, "max_tokens": 10}, timeout=30)
        finally:
            holder.close()
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert error["type"] == "tokens" and "--max-queued-tokens" in error["message"]
        _wait_for(lambda: admission.depth().requests == 0, "the holder's request is cancelled")
        assert httpx.post(f"{server.base_url}/chat/completions", json=GREEDY, timeout=60).status_code == 200


# --- a real server process --------------------------------------------------------------------------


@dataclass
class Served:
    child: ChildProcess
    base: str  # http://127.0.0.1:PORT
    lines: list[str]

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])

    def health(self) -> dict[str, Any]:
        response = httpx.get(f"{self.base}/health", timeout=30)
        assert response.status_code == 200, response.text
        return dict(response.json())


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path) -> Iterator[Served]:
    port = free_port()
    lines: list[str] = []
    command = [console_script("tracelearn"), "serve", "--model", str(tiny_model_dir), "--port", str(port),
               "--served-model-name", SERVED, "--max-batch-size", "1", "--max-queued", str(MAX_QUEUED),
               "--max-queued-tokens", str(MAX_QUEUED_TOKENS), "--threads", str(THREADS), "--prefix-cache-mb", "16"]
    with start_child(command, name="tracelearn serve", on_line=lines.append) as child:
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool | None:
            try:
                return httpx.get(f"{base}/health", timeout=5).status_code == 200 or None
            except httpx.TransportError:
                return None

        child.wait_until(ready, timeout_s=120, what="it answers /health")
        yield Served(child, base, lines)
        assert child.returncode is None, "the server exited during the tests:\n" + "\n".join(lines[-20:])


def test_threads_reach_the_generation_thread(served: Served) -> None:
    assert served.health()["torch_threads"] == THREADS  # what torch.get_num_threads() says on the worker
    assert any(f"torch intra-op threads: {THREADS})" in line for line in served.lines), served.lines


def test_a_full_queue_answers_429_at_once_before_reading_the_body(served: Served) -> None:
    # One engine row: each holder's 32 choices of up to 400 tokens run one after another, and a request
    # leaves the queue when its last choice starts, so all four holders stay queued for many seconds.
    holders = [_raw_request("127.0.0.1", served.port, {**LONG, "n": 32, "seed": 32 * seed})
               for seed in range(MAX_QUEUED)]
    try:
        _wait_for(lambda: served.health()["queue"]["requests"] == MAX_QUEUED, "the holders fill the queue")
        depth = served.health()["queue"]
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", served.port), timeout=30) as connection:
            # Headers announcing 5 MB, and no body at all: the answer cannot wait for it.
            connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"Content-Type: application/json\r\nContent-Length: 5000000\r\n\r\n")
            head, body = _read_response(connection)
        unread = time.monotonic() - started
        polite = httpx.post(f"{served.base}/v1/chat/completions", json=GREEDY, timeout=30)
        models = httpx.get(f"{served.base}/v1/models", timeout=30)
    finally:
        for holder in holders:
            holder.close()
    assert head.startswith("HTTP/1.1 429"), head
    assert "retry-after: 1\r\n" in head.lower()
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert f"{MAX_QUEUED} requests are already waiting" in error["message"] and "--max-queued" in error["message"]
    print(f"429 for a request whose body never came: {unread * 1000:.0f} ms")
    assert unread < 5
    assert polite.status_code == 429 and polite.headers["retry-after"] == "1"
    assert polite.json()["error"] == error
    assert models.status_code == 200 and models.json()["data"][0]["id"] == SERVED
    assert depth["requests"] == MAX_QUEUED and depth["max_requests"] == MAX_QUEUED
    assert depth["max_tokens"] == MAX_QUEUED_TOKENS and depth["tokens"] > 0
    # The holders left: their requests are cancelled and the queue empties.
    _wait_for(lambda: served.health()["queue"]["requests"] == 0, "the abandoned requests leave the queue")
    assert served.health()["queue"]["tokens"] == 0


@pytest.mark.slow
def test_a_flood_gets_429s_while_admitted_requests_complete_as_if_alone(served: Served) -> None:
    url = f"{served.base}/v1/chat/completions"
    expected = httpx.post(url, json=GREEDY, timeout=60).json()["choices"][0]["token_ids"]
    refused_before = served.health()["queue"]["refused"]
    flood = 150
    health: list[tuple[float, dict[str, Any]]] = []
    flooding = threading.Event()
    poller = threading.Thread(target=_poll_health, args=(served, flooding, health), daemon=True)
    flooding.set()
    poller.start()
    try:
        responses = asyncio.run(_flood(served.port, GREEDY, flood))
    finally:
        flooding.clear()
        poller.join(60)
    admitted = [body for status, _, body in responses if status == 200]
    refused = [(headers, body) for status, headers, body in responses if status == 429]
    latencies = sorted(seconds for seconds, _ in health)
    print(f"{flood} concurrent requests, --max-queued {MAX_QUEUED}, one engine row: {len(admitted)} answered, "
          f"{len(refused)} refused (429); /health {len(latencies)} calls during the flood, median "
          f"{latencies[len(latencies) // 2] * 1000:.0f} ms, slowest {latencies[-1] * 1000:.0f} ms")
    assert len(admitted) + len(refused) == flood, sorted({status for status, _, _ in responses})
    assert refused, "nothing was refused: the flood never filled the queue"
    # The first arrivals all got in (and any that came as places freed): a burst fills the queue before
    # its first request has been tokenized, so it may be exactly those.
    assert len(admitted) >= MAX_QUEUED
    for body in admitted:
        assert body["choices"][0]["token_ids"] == expected and body["choices"][0]["finish_reason"] in {"stop", "length"}
    for headers, body in refused:
        assert headers["retry-after"] == "1"
        assert body["error"]["code"] == "rate_limit_exceeded"
        assert f"(--max-queued) is {MAX_QUEUED}" in body["error"]["message"]
    assert all(depth["requests"] <= MAX_QUEUED for _, depth in health)
    assert any(depth["requests"] > 0 for _, depth in health)  # /health showed the queue filled
    assert latencies[len(latencies) // 2] < 0.5
    _wait_for(lambda: served.health()["queue"]["requests"] == 0, "the queue empties")
    assert served.health()["queue"]["refused"] - refused_before == len(refused)
    after = httpx.post(url, json=GREEDY, timeout=60)  # a well-behaved client afterwards
    assert after.status_code == 200 and after.json()["choices"][0]["token_ids"] == expected
    assert served.child.returncode is None


def _poll_health(served: Served, flooding: threading.Event, health: list[tuple[float, dict[str, Any]]]) -> None:
    """``/health`` polled from a thread of its own (the flood's event loop would delay its answers)."""
    with httpx.Client(timeout=30) as client:
        while flooding.is_set():
            started = time.monotonic()
            response = client.get(f"{served.base}/health")
            health.append((time.monotonic() - started, response.json()["queue"]))
            time.sleep(0.02)


async def _flood(port: int, body: dict[str, Any], count: int) -> list[tuple[int, dict[str, str], Any]]:
    """``count`` concurrent requests, each on a connection of its own, written and read as raw HTTP (an
    HTTP client library would spend more time per request than the server): (status, headers, body)."""
    payload = json.dumps(body).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload

    async def send() -> tuple[int, dict[str, str], Any]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        answer = await reader.read()  # to the end: the server closes the connection after answering
        writer.close()
        head, content = answer.split(b"\r\n\r\n", 1)
        status, *fields = head.decode().split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, value in (f.split(":", 1) for f in fields)}
        return int(status.split()[1]), headers, json.loads(content)

    return list(await asyncio.gather(*(send() for _ in range(count))))


def _raw_request(host: str, port: int, body: dict[str, Any]) -> socket.socket:
    """A non-streaming request sent on a connection of its own; closing the socket abandons it."""
    payload = json.dumps(body).encode()
    connection = socket.create_connection((host, port), timeout=30)
    connection.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return connection


def _read_response(connection: socket.socket) -> tuple[str, str]:
    """The head and body of one HTTP response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += connection.recv(65536)
    return head.decode() + "\r\n", body.decode()


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)
