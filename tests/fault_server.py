"""A loopback OpenAI-style chat server that misbehaves on purpose (fault injection only).

Real answers come from the llama.cpp server in the other tests; this one exists to
produce, on demand, what a real server does only by accident: HTTP 500s, hangs past the
client timeout, bodies that are not JSON, latency that reorders completions.

``FaultServer(plan)`` — ``plan(prompt, attempt)`` returns the action for the
``attempt``-th request (0-based) carrying that last user message: ``"ok"``, ``"500"``,
``"400"``, ``"hang"``, ``"badjson"``, ``"empty"`` or ``("ok", delay_seconds)``.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Plan = Callable[[str, int], Any]


class FaultServer:
    def __init__(self, plan: Plan, *, hang_seconds: float = 3.0) -> None:
        self.plan = plan
        self.hang_seconds = hang_seconds
        self.attempts: Counter = Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._send(200, json.dumps({"object": "list", "data": [{"id": "fault-model"}]}).encode())

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length))
                prompt = request["messages"][-1]["content"]
                with server.lock:
                    attempt = server.attempts[prompt]
                    server.attempts[prompt] += 1
                action = server.plan(prompt, attempt)
                delay = 0.0
                if isinstance(action, tuple):
                    action, delay = action
                time.sleep(delay)
                if action == "500":
                    self._send(500, b'{"error": {"message": "injected failure"}}')
                elif action == "400":
                    self._send(400, b'{"error": {"message": "prompt too long"}}')
                elif action == "hang":
                    time.sleep(server.hang_seconds)
                    self._send(200, b"{}")
                elif action == "badjson":
                    self._send(200, b'{"choices": [ this is not json')
                elif action == "empty":
                    self._send(
                        200, json.dumps({"id": "x", "object": "chat.completion", "choices": []}).encode()
                    )
                else:
                    answer = f"answer to: {prompt[:40]} (attempt {attempt})"
                    body = {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": "fault-model",
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": answer},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17},
                    }
                    self._send(200, json.dumps(body).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, client_address: None  # clients that gave up
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FaultServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
