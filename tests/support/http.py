"""One participant's browser over plain HTTP, for the concurrency tests and the load benchmark.

``BrowserClient`` keeps its cookies (Django's session and CSRF cookies) and one HTTP
connection, sends ``X-CSRFToken`` on unsafe requests as the trial runner does, and reports
every answer to an optional ``observe(endpoint, method, path, status, seconds, data)``
callback (latencies, status counts). Transport failures:

- a kept-alive connection the server had just closed (its keep-alive timeout) never reached
  the application: the request is sent again once on a new connection and ``on_reconnect``
  is called (judgments carry idempotency keys, as in the browser);
- a refused or reset connection (the server's backlog was full) is retried
  ``connect_retries`` times after short sleeps (default 0: an error; the concurrency test,
  whose writes are idempotent, retries as a browser would);
- anything else raises :class:`RequestFailed` (after ``on_error``).

``keep_alive=False`` opens a connection per request (``Connection: close``); such a client
may then send from several threads at once (a retry racing its original). Cookies are shared.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from http.cookies import SimpleCookie


class RequestFailed(Exception):
    """The request got no HTTP answer (or, for callers that check, an unexpected one)."""


class BrowserClient:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 60.0,
        user_agent: str = "perceptlab-test-client",
        keep_alive: bool = True,
        connect_retries: int = 0,
        observe: Callable[[str, str, str, int, float, bytes], None] | None = None,
        on_reconnect: Callable[[str], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.user_agent, self.keep_alive = user_agent, keep_alive
        self.connect_retries = connect_retries
        self.observe, self.on_reconnect, self.on_error = observe, on_reconnect, on_error
        self.cookies: dict[str, str] = {}
        self.conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _connection(self) -> http.client.HTTPConnection:
        if not self.keep_alive:  # a connection of this request's own: safe across threads
            return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self.conn

    def _fail(self, message: str, exc: BaseException) -> RequestFailed:
        self.close()
        if self.on_error:
            self.on_error(message)
        return RequestFailed(message)

    def request(
        self, method: str, path: str, *, body: bytes | None = None,
        content_type: str | None = None, endpoint: str = "",
    ) -> tuple[int, http.client.HTTPResponse, bytes]:
        """``(status, response, body)``; cookies updated from ``Set-Cookie``."""
        headers = {"User-Agent": self.user_agent, "Accept": "*/*"}
        if not self.keep_alive:
            headers["Connection"] = "close"
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if method != "GET" and "csrftoken" in self.cookies:
            headers["X-CSRFToken"] = self.cookies["csrftoken"]
        if content_type:
            headers["Content-Type"] = content_type
        what = f"{endpoint} {method} {path}".strip()
        stale_retried, refused = False, 0
        while True:
            conn = self._connection()
            reused = conn.sock is not None
            started = time.perf_counter()
            try:
                try:
                    conn.request(method, path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                finally:
                    if not self.keep_alive:
                        conn.close()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self.close()
                if reused and not stale_retried:
                    stale_retried = True
                    if self.on_reconnect:
                        self.on_reconnect(endpoint)
                    continue
                raise self._fail(f"{what}: {exc!r}", exc) from exc
            except ConnectionError as exc:
                # Refused (a full backlog) or reset before an answer: retried, as a browser
                # would; only for callers whose writes are idempotent (judgments carry keys).
                self.close()
                if refused < self.connect_retries:
                    refused += 1
                    time.sleep(0.1 * refused)
                    continue
                raise self._fail(f"{what}: {exc!r}", exc) from exc
            except Exception as exc:  # noqa: BLE001 - timeouts and the like: all failures
                raise self._fail(f"{what}: {exc!r}", exc) from exc
            break
        elapsed = time.perf_counter() - started
        if self.keep_alive and response.will_close:
            self.close()
        for raw in response.headers.get_all("Set-Cookie") or []:
            cookie = SimpleCookie()
            cookie.load(raw)
            self.cookies.update({name: morsel.value for name, morsel in cookie.items()})
        if self.observe:
            self.observe(endpoint, method, path, response.status, elapsed, data)
        return response.status, response, data

    def get_json(self, path: str, endpoint: str = "") -> tuple[int, dict]:
        status, _, data = self.request("GET", path, endpoint=endpoint)
        return status, json.loads(data) if data else {}

    def send_json(
        self, method: str, path: str, payload: dict, endpoint: str = ""
    ) -> tuple[int, dict]:
        status, _, data = self.request(
            method, path, body=json.dumps(payload).encode(), content_type="application/json",
            endpoint=endpoint,
        )
        try:
            return status, json.loads(data) if data else {}
        except ValueError:
            return status, {"error": data[:300].decode(errors="replace")}
