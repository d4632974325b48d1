"""Running the app under uvicorn: bind, log one line per request, stop cleanly on SIGINT / SIGTERM."""

import contextlib
import logging
import signal
import socket
import sys
import threading

import uvicorn

from spqt.errors import SpqtError
from spqt.serve.app import build_app
from spqt.serve.engine import Engine
from spqt.serve.response_store import DEFAULT_CAPACITY
from spqt.serve.scheduler import Scheduler

log = logging.getLogger("spqt.serve")

# After a signal, streams are cancelled at their next token; connections still open after this long
# are closed anyway.
GRACEFUL_SECONDS = 5


class _Server(uvicorn.Server):
    """uvicorn's server, with a signal first cancelling the running and queued generations (so open
    streams end at once), and without re-raising the signal after shutdown (a signal is the normal way
    to stop a server: exit code 0)."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler):
        super().__init__(config)
        self.scheduler = scheduler
        self.signal_name: str | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        self.signal_name = signal.Signals(sig).name
        self.scheduler.cancel_all()
        super().handle_exit(sig, frame)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one, chosen by the system). Listening from here on, so
    clients that connect while the model loads wait in the backlog instead of being refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise SpqtError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def setup_logging() -> None:
    """One line per event on stderr (once per process, however often it is called)."""
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s spqt serve: %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def uvicorn_config(app) -> uvicorn.Config:
    """uvicorn's settings for the app: no access log (one line per request is ours), a graceful shutdown of
    GRACEFUL_SECONDS; its HTTP parser and event loop "auto": httptools and uvloop, dependencies of spqt where they
    exist (not uvloop on Windows), else h11 and asyncio."""
    return uvicorn.Config(app, access_log=False, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SECONDS)


class Service:
    """The app, its scheduler and the uvicorn server around one engine."""

    def __init__(self, engine: Engine, api_key: str | None = None, allow_origins: tuple[str, ...] = (),
                 stored_responses: int = DEFAULT_CAPACITY):
        self.engine = engine
        self.scheduler = Scheduler(engine.run)
        app = build_app(engine, self.scheduler, api_key, allow_origins, stored_responses)
        self.server = _Server(uvicorn_config(app), self.scheduler)

    def run(self, sock: socket.socket) -> None:
        """Serve on a bound socket until SIGINT / SIGTERM (main thread) or stop(); then the worker stops."""
        try:
            self.server.run(sockets=[sock])
        finally:
            self.scheduler.close()

    def stop(self) -> None:
        """Ask a running service to stop (from any thread): what runs is cancelled, run() returns."""
        self.scheduler.cancel_all()
        self.server.should_exit = True


def serve(engine: Engine, sock: socket.socket, api_key: str | None = None, allow_origins: tuple[str, ...] = (),
          stored_responses: int = DEFAULT_CAPACITY) -> None:
    """Serve on a bound socket (see bind) until SIGINT or SIGTERM; returns after a clean shutdown. allow_origins: the
    browser origins answered cross-origin (CORS; "*" any); stored_responses: how many responses the Responses API
    keeps (0: none)."""
    service = Service(engine, api_key, allow_origins, stored_responses)
    host, port = sock.getsockname()[:2]
    i = engine.info
    log.info("model %s on %s, %s, context %d tokens, prompt cache %s%s", i.model_id, i.device,
             engine.sparsity_label(), i.ctx, "on" if engine.prompt_cache else "off",
             ", API key required" if api_key else "")
    if allow_origins:
        log.info("cross-origin requests from %s", ", ".join(allow_origins))
    log.info("listening on http://%s:%d", f"[{host}]" if ":" in host else host, port)
    service.run(sock)
    name = service.server.signal_name
    log.info("stopped%s", f" ({name})" if name else "")
