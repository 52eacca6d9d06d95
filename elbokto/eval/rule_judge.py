"""A rule-based judge served over HTTP as an OpenAI-compatible chat-completions endpoint.

For tasks with a checkable answer (the demo) and for tests: :class:`RuleJudgeServer` listens on
127.0.0.1, reads the question and both answers back out of the judge template, asks a Python
``rule(question, answer_a, answer_b)`` for "A", "B" or "C" and answers MT-Bench style
(``... [[A]]``). With the pointwise template and ``slots=POINTWISE_SLOTS`` it reads one answer
and asks ``rule(question, answer)`` for "GOOD" or "BAD" instead (``... [[GOOD]]``). A rule that
returns None makes it answer without a verdict. ``faults`` makes it misbehave on its first
requests, in arrival order, to exercise a client's retries:

- ``"garbage"``: a 200 answer with no verdict;
- ``"timeout"``: the answer comes after ``delay`` seconds (longer than the client's timeout);
- ``"429"`` / ``"500"``: that HTTP status with an OpenAI-style error body.

    with RuleJudgeServer(rule, faults=["429", "garbage"]) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none")
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from elbokto.eval.template import SLOTS, load_template, unrender

__all__ = ["FAULTS", "RuleJudgeServer"]

FAULTS = ("garbage", "timeout", "429", "500")
Rule = Callable[..., "str | None"]


class RuleJudgeServer:
    """A chat-completions server on 127.0.0.1 (a free port) in a daemon thread.

    Args:
        rule: (question, answer_a, answer_b) -> "A", "B", "C" or None (no verdict); with pointwise
            slots (question, answer) -> "GOOD", "BAD" or None.
        template: the judge template the client renders (default: the packaged one); a message
            that does not fit it gets a 400.
        faults: misbehaviours of the first requests, one per request (see the module doc).
        delay: seconds a ``"timeout"`` fault waits before answering.
        slots: the template's slots, in the order the rule takes them (``SLOTS``: pairwise;
            ``POINTWISE_SLOTS``: one answer).

    Attributes:
        base_url: ``http://127.0.0.1:<port>/v1``, for the client's ``base_url``.
        requests: number of chat-completions requests received.
    """

    def __init__(
        self,
        rule: Rule,
        template: str | None = None,
        faults: Iterable[str] = (),
        delay: float = 2.0,
        slots: tuple[str, ...] = SLOTS,
    ) -> None:
        faults = list(faults)
        unknown = [f for f in faults if f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown faults {unknown}; expected some of {FAULTS}")
        self.rule, self.template, self.delay = rule, template or load_template(), delay
        self.slots = slots
        self.requests = 0
        self._faults = faults
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> RuleJudgeServer:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits for a serve_forever that never ran
            self._server.shutdown()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> RuleJudgeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _next_fault(self) -> str | None:
        with self._lock:
            self.requests += 1
            return self._faults.pop(0) if self._faults else None

    def reply(self, body: dict) -> tuple[int, dict]:
        """(HTTP status, JSON body) for one chat-completions request body."""
        fault = self._next_fault()
        if fault in ("429", "500"):
            return int(fault), {
                "error": {"message": f"injected {fault}", "type": "server_error", "code": fault}
            }
        if fault == "timeout":
            time.sleep(self.delay)
        messages = body.get("messages") or [{}]
        fields = unrender(self.template, str(messages[-1].get("content", "")), self.slots)
        if fields is None:
            return 400, {
                "error": {
                    "message": "the message does not fit the judge template",
                    "type": "invalid_request_error",
                }
            }
        verdict = (
            None if fault == "garbage" else self.rule(*(fields[slot[1:-1]] for slot in self.slots))
        )
        text = (
            "I cannot decide."
            if verdict is None
            else f"Judged by rule. Final verdict: [[{verdict}]]"
        )
        return 200, {
            "id": f"rule-{self.requests}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "rule"),
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": text},
                }
            ],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }


def _handler(server: RuleJudgeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.rstrip("/").endswith("/models"):
                self._send(
                    200,
                    {
                        "object": "list",
                        "data": [
                            {"id": "rule", "object": "model", "created": 0, "owned_by": "elbokto"}
                        ],
                    },
                )
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path.rstrip("/").endswith("/chat/completions"):
                self._send(*server.reply(body))
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (its timeout): nothing to answer

        def log_message(self, *args) -> None:
            pass  # quiet: tests and the demo make hundreds of calls

    return Handler
