"""``serve(cfg)``, what ``gptmini serve`` and ``python serve.py`` run: load the checkpoint, start the engine
and uvicorn, and shut down cleanly.

uvicorn runs in a thread (``BackgroundServer``, which the tests and bench/serve.py use too) while the main
thread waits for Ctrl-C or SIGTERM. Either one stops new requests, ends every running stream with a final
chunk (finish_reason "abort"), lets uvicorn finish those replies and returns: the command exits 0 within a
few seconds. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import socket
import threading
from pathlib import Path

import torch

from gptmini.common import GptMiniError, pick_device, say
from gptmini.generation.chat import checkpoint_template
from gptmini.serve.app import Site, create_app
from gptmini.serve.config import ServeConfig, validated
from gptmini.serve.engine import Engine
from gptmini.serve.protocol import Limits
from gptmini.threads import AUTO, apply_threads

SHUTDOWN_GRACE_S = 5  # how long uvicorn waits for replies to finish once told to stop


def serve(cfg: ServeConfig) -> None:
    """Serve the checkpoint until Ctrl-C or SIGTERM. Bad options fail before the checkpoint loads."""
    cfg = validated(cfg)
    device = pick_device(cfg.device)
    listener = bind(cfg.host, cfg.port)  # a port in use fails before minutes of loading
    if cfg.public and cfg.api_key is None:
        say(
            f"warning: serving on {cfg.host} without an api_key: anyone who can reach this machine may use "
            "the model. Set api_key=... (or host=127.0.0.1 for this machine only)."
        )
    site = load_site(cfg, device)
    server = BackgroundServer(site, listener)
    server.start()
    say(f"serving {site.model_id} at {server.url}/ (the page; the API under {server.url}/v1); Ctrl-C stops")
    _wait_for_signal(server)
    say("stopped")


def load_site(cfg: ServeConfig, device: torch.device) -> Site:
    """The checkpoint loaded, the CPU threads chosen and the engine started: everything the app serves."""
    from gptmini.weights import load_checkpoint

    loaded = load_checkpoint(cfg.ckpt, device=device)
    model = loaded.model
    say(f"loaded {loaded.path} ({model.num_params() / 1e6:.2f}M parameters) on {device}")
    template = checkpoint_template(loaded.info)  # one this gptmini cannot read fails before serving
    if device.type == "cpu":
        probe = batched_decode_probe(model, cfg.max_batch) if cfg.threads == AUTO else None
        say(apply_threads(cfg.threads, probe).describe())
    engine = Engine(model, loaded.tokenizer, cfg.max_batch, cfg.max_queue)
    engine.start()
    limits = Limits(
        loaded.tokenizer, model.config.block_size, template, cfg.default_max_tokens, cfg.max_tokens_cap
    )
    model_id = cfg.model_name or _model_id(loaded.path, loaded.info)
    return Site(engine, limits, model_id, cfg.api_key, tuple(cfg.cors_origins), cfg.max_body_bytes)


def _model_id(path: Path, info: dict) -> str:
    """A Hugging Face model's name, else the checkpoint's path (relative to here when it is below)."""
    if isinstance(info.get("hf"), str):
        return info["hf"]
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def batched_decode_probe(model: torch.nn.Module, max_batch: int):
    """A few of the engine's own steps (max_batch rows over the whole cache): what threads=auto times."""
    device = model.wte.weight.device
    cache = model.new_kv_cache(max_batch)
    token = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
    position = torch.zeros(max_batch, dtype=torch.long, device=device)

    @torch.inference_mode()
    def step() -> None:
        for _ in range(4):
            model.decode_step(token, position, cache)

    return step


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), or one line saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise GptMiniError(
            f"cannot listen on {host}:{port}: {error.strerror or error}. Pick another port=... (port=0 takes "
            "any free one) or another host."
        ) from None
    sock.listen(2048)
    return sock


class BackgroundServer:
    """uvicorn serving ``site`` on ``listener`` in a thread; ``stop()`` ends it the graceful way."""

    def __init__(self, site: Site, listener: socket.socket):
        import uvicorn

        self.site = site
        self.listener = listener
        config = uvicorn.Config(
            create_app(site),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="gptmini-http", daemon=True)

    def _run(self) -> None:
        self.server.run(sockets=[self.listener])  # not the main thread: uvicorn leaves the signals alone

    @property
    def url(self) -> str:
        host, port = self.listener.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        waited = 0.0
        while not self.server.started and self.thread.is_alive() and waited < timeout:
            self.thread.join(0.02)
            waited += 0.02
        if not self.server.started:
            raise GptMiniError(f"the web server did not start on {self.url}; see the messages above.")

    def stop(self) -> None:
        """No new requests; running ones end with a final chunk; uvicorn then finishes and closes."""
        self.site.engine.shutdown()
        self.server.should_exit = True

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)
        self.site.engine.shutdown(wait=timeout)


def _wait_for_signal(server: BackgroundServer) -> None:
    """Block until the server has stopped; Ctrl-C or SIGTERM stops it (a second one: at once)."""
    stopping = threading.Event()

    def on_signal(signum: int, frame) -> None:
        if stopping.is_set():
            server.server.force_exit = True
            return
        stopping.set()
        say(f"\n{signal.Signals(signum).name}: finishing the running replies, then stopping")
        server.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while server.thread.is_alive():
            server.thread.join(0.2)  # short joins: the signal handler runs between them
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    server.site.engine.shutdown(wait=SHUTDOWN_GRACE_S)
