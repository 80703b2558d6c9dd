"""The connection side of `pneumo serve`'s limits: uvicorn's h11 protocol with a header timeout,
a cap on open connections and a bounded shutdown.

uvicorn closes a keep-alive connection that stays silent, but not one that connects and never
finishes its headers: 31 such sockets held every slot of the old 32-connection limit, and /health
answered 503 until the clients let go. Here a connection must complete its request line and
headers within the header timeout of connecting or of its previous answer; the body's own
deadline is the app's (pneumo.deploy.serve.read_upload), since only the app knows one is wanted.
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from pneumo.limits import GRACEFUL_SHUTDOWN_S, HEADER_TIMEOUT_S, MAX_CONNECTIONS


def _raw_response(status: str, text: str) -> bytes:
    # written outside h11: there is no request to answer, which h11 would refuse
    body = text.encode()
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


class GuardedH11Protocol(H11Protocol):
    """H11Protocol whose connections cannot be held open without a request (class attributes:
    the production limits; `guarded_protocol` makes a class with others, for tests)."""

    header_timeout = HEADER_TIMEOUT_S
    shutdown_timeout = GRACEFUL_SHUTDOWN_S
    max_connections = MAX_CONNECTIONS
    _header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(
                _raw_response(
                    "503 Service Unavailable",
                    f"over {self.max_connections} open connections (pneumo.limits.MAX_CONNECTIONS)",
                )
            )
            transport.close()
            return
        self._await_request()

    def on_response_complete(self) -> None:
        # armed before super(): a pipelined request it starts replaces self.cycle, which disarms the timer
        self._await_request()
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _await_request(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_deadline, self.cycle)

    def _header_deadline(self, cycle_then) -> None:
        if self.cycle is not cycle_then or self.transport.is_closing():
            return  # a request arrived in time (it has its own cycle)
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            # part of a request came: say why it ends (a silent or draining client just loses the socket)
            self.transport.write(
                _raw_response("408 Request Timeout", f"request headers not received within {self.header_timeout:g} s")
            )
        self.transport.close()

    def shutdown(self) -> None:
        super().shutdown()
        if self.cycle is not None and self.cycle.more_body and not self.cycle.response_complete:
            # an upload still arriving: closing the socket ends the app's read as a client disconnect,
            # before uvicorn's graceful-shutdown timeout cancels the request (and logs a traceback)
            self.loop.call_later(self.shutdown_timeout / 2, self.transport.close)


def guarded_protocol(header_timeout: float, shutdown_timeout: float, max_connections: int = MAX_CONNECTIONS):
    """GuardedH11Protocol with other limits."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout": header_timeout, "shutdown_timeout": shutdown_timeout, "max_connections": max_connections},
    )
