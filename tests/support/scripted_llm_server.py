"""A real OpenAI-compatible chat-completions server with scripted answers, for tests and examples.

``ScriptedLLMServer`` listens on a free loopback port (``http.server`` in a background thread) and
answers ``POST /v1/chat/completions`` (streaming SSE and not) with deterministic replies, shaped
like vLLM's when asked for token ids: top-level ``prompt_token_ids``, ``choices[i].token_ids`` and,
in a stream, the prompt ids on the first chunk and each chunk's own ids. Text is tokenized as its
UTF-8 bytes plus ``TOKEN_OFFSET``, so a test can compute the ids it expects with ``tokenize``;
prompt ids are those of ``render_prompt(messages)``; usage counts are the lengths of the ids;
logprobs are ``logprob_of(id)``.

The default script (``default_script``) behaves like a small tool-using model: with ``tools`` and no
``tool`` message yet it calls the first tool with an arithmetic expression taken from the user's
question; after a tool result (a ``tool`` message, or smolagents' ``Observation:`` user turn) it
answers with that result, through a ``final_answer`` tool when one is offered; without tools it
echoes the last message. Pass your own ``script`` to answer differently.

A script may raise ``ScriptedError(status, message)`` to answer with an HTTP error. Switches a test
can flip at any time: ``reject_token_ids`` (answer a request carrying ``return_token_ids`` with
HTTP 400, like a hosted API) and ``token_ids`` (``False``: ignore the parameter, like a server that
does not support it). ``requests`` logs every request body.

Run it by hand for the example agent: ``python tests/support/scripted_llm_server.py --port 8000``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN_OFFSET = 1000
CREATED = 1_700_000_000
REJECTION_MESSAGE = "Unrecognized request argument supplied: return_token_ids"
_STREAM_PIECE_CHARS = 4
FINAL_ANSWER_TOOL = "final_answer"
OBSERVATION_PREFIX = "Observation:"

_WORD_OPERATORS = (
    (r"\bmultiplied by\b", "*"),
    (r"\bdivided by\b", "/"),
    (r"\bplus\b", "+"),
    (r"\bminus\b", "-"),
    (r"\btimes\b", "*"),
    (r"\bover\b", "/"),
)
_EXPRESSION = re.compile(r"[\d(][\d\s+\-*/().]*")


# --- Tokens -----------------------------------------------------------------------------------------


def tokenize(text: str) -> list[int]:
    """The scripted tokenizer: one id per UTF-8 byte, offset so ids never look like bytes."""
    return [TOKEN_OFFSET + byte for byte in text.encode("utf-8")]


def detokenize(ids: Sequence[int]) -> str:
    return bytes(i - TOKEN_OFFSET for i in ids).decode("utf-8", errors="replace")


def logprob_of(token_id: int) -> float:
    """A deterministic, plausible logprob for a token id."""
    return -((token_id % 17) + 1) / 20.0


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def render_prompt(messages: Sequence[dict[str, Any]]) -> str:
    """The prompt text whose tokens are the prompt ids: a ChatML-like rendering of the messages."""
    parts = []
    for message in messages:
        text = _text_of(message.get("content"))
        for call in message.get("tool_calls") or ():
            function = call.get("function", {})
            text += _tool_call_text(str(function.get("name", "")), str(function.get("arguments", "")))
        parts.append(f"<|{message.get('role', 'user')}|>{text}\n")
    return "".join(parts) + "<|assistant|>"


def prompt_ids(messages: Sequence[dict[str, Any]]) -> list[int]:
    """The prompt token ids the server reports for these messages."""
    return tokenize(render_prompt(messages))


def _tool_call_text(name: str, arguments: str) -> str:
    return f'<tool_call>{{"name": {json.dumps(name)}, "arguments": {arguments}}}</tool_call>'


# --- Scripts ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScriptedToolCall:
    name: str
    arguments: str  # JSON text, as the API carries it


@dataclass(frozen=True)
class Reply:
    """What the scripted model answers: text, or tool calls."""

    text: str | None = None
    tool_calls: tuple[ScriptedToolCall, ...] = ()

    def completion_text(self) -> str:
        """The text the model 'generated' (what the response token ids spell)."""
        return (self.text or "") + "".join(_tool_call_text(c.name, c.arguments) for c in self.tool_calls)


Script = Callable[[dict[str, Any]], Reply]


class ScriptedError(Exception):
    """Raised by a script to answer with an HTTP error, as a real server would (context too long...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def arithmetic_expression(question: str) -> str:
    """The arithmetic in a word problem (``"What is 3 plus 4?"`` -> ``"3 + 4"``), else the question."""
    text = question.lower()
    for pattern, operator in _WORD_OPERATORS:
        text = re.sub(pattern, f" {operator} ", text)
    candidates = [m.group().strip() for m in _EXPRESSION.finditer(text)]
    candidates = [c.rstrip(".").strip() for c in candidates if any(ch.isdigit() for ch in c)]
    if not candidates:
        return question
    return re.sub(r"\s+", " ", max(candidates, key=len))


def tool_result(message: dict[str, Any]) -> str | None:
    """The tool result a message carries: a ``tool`` message, or smolagents' ``Observation:`` user turn."""
    text = _text_of(message.get("content"))
    if message.get("role") == "tool":
        return text
    if message.get("role") == "user" and text.startswith(OBSERVATION_PREFIX):
        return text.removeprefix(OBSERVATION_PREFIX).strip()
    return None


def _call(function: dict[str, Any], value: str) -> Reply:
    """A call of ``function`` with ``value`` as its first parameter."""
    properties = list((function.get("parameters") or {}).get("properties") or {})
    arguments = {properties[0]: value} if properties else {}
    return Reply(tool_calls=(ScriptedToolCall(str(function.get("name", "")), json.dumps(arguments)),))


def default_script(body: dict[str, Any]) -> Reply:
    """Call the first tool with the question's arithmetic; after a tool result, answer with it.

    A ``final_answer`` tool (smolagents ends runs with one) is never the first call; the answer is
    a call of it when it is offered, text otherwise.
    """
    messages: list[dict[str, Any]] = body.get("messages") or []
    functions = [t.get("function", {}) for t in body.get("tools") or []]
    results = [r for r in map(tool_result, messages) if r is not None]
    workers = [f for f in functions if f.get("name") != FINAL_ANSWER_TOOL]
    if workers and not results:
        question = next((_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        return _call(workers[0], arithmetic_expression(question))
    last = messages[-1] if messages else {}
    result = tool_result(last)
    if result is not None:
        finals = [f for f in functions if f.get("name") == FINAL_ANSWER_TOOL]
        return _call(finals[0], result) if finals else Reply(text=result)
    return Reply(text=f"You said: {_text_of(last.get('content'))}")


# --- Responses --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    body: dict[str, Any]


@dataclass
class _Generation:
    """One choice of one response: the reply, its ids, why it stopped."""

    index: int
    reply: Reply
    ids: list[int]
    finish_reason: str


def _generate(reply: Reply, index: int, max_tokens: int | None) -> _Generation:
    ids = tokenize(reply.completion_text())
    if reply.tool_calls:
        return _Generation(index, reply, ids, "tool_calls")
    if max_tokens is not None and len(ids) > max_tokens:
        # Cut at a character boundary so the text and its ids stay one and the same.
        text = (reply.text or "").encode("utf-8")[:max_tokens].decode("utf-8", errors="ignore")
        return _Generation(index, Reply(text=text), tokenize(text), "length")
    return _Generation(index, reply, ids, "stop")


def _logprobs(ids: Sequence[int], top: int) -> dict[str, Any]:
    content = []
    for token_id in ids:
        entry = {"token": detokenize([token_id]), "logprob": logprob_of(token_id), "bytes": [token_id - TOKEN_OFFSET]}
        content.append({**entry, "top_logprobs": [entry] if top > 0 else []})
    return {"content": content}


def _tool_calls_json(reply: Reply, response_number: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"call_{response_number}_{j}",
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for j, call in enumerate(reply.tool_calls)
    ]


class ScriptedLLMServer:
    """A loopback OpenAI-compatible server; use as a context manager or ``start()`` / ``stop()``."""

    def __init__(
        self,
        script: Script = default_script,
        *,
        token_ids: bool = True,
        reject_token_ids: bool = False,
        model: str = "scripted-model",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.script = script
        self.token_ids = token_ids
        self.reject_token_ids = reject_token_ids
        self.model = model
        self.requests: list[RecordedRequest] = []
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> ScriptedLLMServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ScriptedLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def response_token_ids(self, body: dict[str, Any]) -> list[int]:
        """The token ids of choice 0 of the answer to ``body`` (scripts are deterministic)."""
        return self._generations(body)[0].ids

    def chat_requests(self) -> list[dict[str, Any]]:
        """The bodies of the chat-completions requests received so far, oldest first."""
        with self._lock:
            return [r.body for r in self.requests if r.path.endswith("/chat/completions")]

    # -- request handling (runs on the server's threads) --

    def _record(self, path: str, body: dict[str, Any]) -> int:
        with self._lock:
            self.requests.append(RecordedRequest(path, body))
            return next(self._numbers)

    def _generations(self, body: dict[str, Any]) -> list[_Generation]:
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        reply = self.script(body)
        generations = []
        for index in range(int(body.get("n") or 1)):
            # Choices after the first differ by a suffix, so their ids differ from choice 0's.
            variant = reply if index == 0 or reply.tool_calls else Reply(text=f"{reply.text or ''} ({index})")
            generations.append(_generate(variant, index, max_tokens))
        return generations

    def completion(self, body: dict[str, Any], number: int) -> dict[str, Any]:
        """The non-streamed response to a chat-completions request."""
        with_ids = self.token_ids and bool(body.get("return_token_ids"))
        top = int(body.get("top_logprobs") or 0)
        prompt = prompt_ids(body.get("messages") or [])
        generations = self._generations(body)
        choices = []
        for gen in generations:
            message: dict[str, Any] = {"role": "assistant", "content": gen.reply.text}
            if gen.reply.tool_calls:
                message["tool_calls"] = _tool_calls_json(gen.reply, number)
            choice: dict[str, Any] = {
                "index": gen.index,
                "message": message,
                "finish_reason": gen.finish_reason,
                "logprobs": _logprobs(gen.ids, top) if body.get("logprobs") else None,
            }
            if with_ids:
                choice["token_ids"] = gen.ids
            choices.append(choice)
        completion_tokens = sum(len(gen.ids) for gen in generations)
        response: dict[str, Any] = {
            "id": f"chatcmpl-scripted-{number}",
            "object": "chat.completion",
            "created": CREATED,
            "model": body.get("model") or self.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": completion_tokens,
                "total_tokens": len(prompt) + completion_tokens,
            },
        }
        if with_ids:
            response["prompt_token_ids"] = prompt
        return response

    def chunks(self, body: dict[str, Any], number: int) -> list[dict[str, Any]]:
        """The streamed response, chunk by chunk, in vLLM's shape."""
        return list(self._chunks(body, number))

    def _chunks(self, body: dict[str, Any], number: int) -> Iterator[dict[str, Any]]:
        with_ids = self.token_ids and bool(body.get("return_token_ids"))
        top = int(body.get("top_logprobs") or 0)
        prompt = prompt_ids(body.get("messages") or [])
        generations = self._generations(body)
        base = {
            "id": f"chatcmpl-scripted-{number}",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": body.get("model") or self.model,
        }

        def chunk(index: int, delta: dict[str, Any], ids: list[int], finish: str | None = None) -> dict[str, Any]:
            choice: dict[str, Any] = {
                "index": index,
                "delta": delta,
                "finish_reason": finish,
                "logprobs": _logprobs(ids, top) if body.get("logprobs") and ids else None,
            }
            if with_ids:
                choice["token_ids"] = ids
            return {**base, "choices": [choice]}

        for gen in generations:
            first = {
                **base,
                "choices": [
                    {
                        "index": gen.index,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                        "logprobs": None,
                    }
                ],
            }
            if with_ids:
                first["prompt_token_ids"] = prompt
            yield first
            text = gen.reply.text or ""
            for start in range(0, len(text), _STREAM_PIECE_CHARS):
                piece = text[start : start + _STREAM_PIECE_CHARS]
                yield chunk(gen.index, {"content": piece}, tokenize(piece))
            for j, call in enumerate(_tool_calls_json(gen.reply, number)):
                text_ids = tokenize(_tool_call_text(call["function"]["name"], call["function"]["arguments"]))
                yield chunk(gen.index, {"tool_calls": [{"index": j, **call}]}, text_ids)
            yield chunk(gen.index, {}, [], gen.finish_reason)
        if (body.get("stream_options") or {}).get("include_usage"):
            completion_tokens = sum(len(gen.ids) for gen in generations)
            usage = {
                "prompt_tokens": len(prompt),
                "completion_tokens": completion_tokens,
                "total_tokens": len(prompt) + completion_tokens,
            }
            yield {**base, "choices": [], "usage": usage}


def _handler_for(server: ScriptedLLMServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 30

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: tests read ``server.requests`` instead of a log on stderr."""

        def _send_json(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/").endswith("/models"):
                self._send_json(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
            else:
                self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                self._send_json(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
                return
            if not self.path.rstrip("/").endswith("/chat/completions") or not isinstance(body, dict):
                self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                return
            number = server._record(self.path, body)
            if server.reject_token_ids and "return_token_ids" in body:
                error = {"message": REJECTION_MESSAGE, "type": "invalid_request_error", "param": None, "code": None}
                self._send_json(400, {"error": error})
                return
            try:
                if not body.get("stream"):
                    self._send_json(200, server.completion(body, number))
                    return
                events = server.chunks(body, number)
            except ScriptedError as scripted:
                error = {"message": scripted.message, "type": "invalid_request_error", "param": None, "code": None}
                self._send_json(scripted.status, {"error": error})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for event in events:
                self._send_chunk(f"data: {json.dumps(event)}\n\n".encode())
            self._send_chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")

        def _send_chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve scripted chat completions on loopback.")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--reject-token-ids", action="store_true", help="answer return_token_ids with 400")
    args = parser.parse_args()
    server = ScriptedLLMServer(port=args.port, reject_token_ids=args.reject_token_ids).start()
    print(f"scripted LLM server on {server.base_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
