"""ServeConfig: the options of ``python serve.py``, one docstring each, checked before anything loads.

configs/serve.yaml only picks this schema, so Hydra refuses a misspelt key when it composes the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from gptmini.common import GptMiniError
from gptmini.threads import check_threads_setting

SCHEMA_NAME = "serve_schema"


@dataclass
class ServeConfig:
    """Options of ``python serve.py``; configs/serve.yaml picks this schema and sets nothing else."""

    ckpt: str = "latest"
    """What to serve: anything generate.py's ckpt takes (a .ckpt, a run directory, ``latest``, a LoRA
    checkpoint, a Hugging Face folder, gpt2)."""
    host: str = "127.0.0.1"
    """Address to listen on. The default is this machine only; another address (0.0.0.0 = every interface)
    without an api_key prints a warning, since anyone who can reach it may use the model."""
    port: int = 8000
    """TCP port; 0 picks a free one (printed at start)."""
    api_key: Optional[str] = None  # noqa: UP045 - OmegaConf reads typing.Optional
    """When set, every /v1/* request needs ``Authorization: Bearer <api_key>`` (what the openai client sends);
    the page and /health stay public. null = no key."""
    max_batch: int = 8
    """Requests decoded together (the KV cache's slots); more wait in the queue."""
    max_queue: int = 64
    """Requests that may wait for a slot; one more is answered 503 with Retry-After."""
    default_max_tokens: int = 256
    """Tokens generated for a request that gives no max_tokens (or max_completion_tokens)."""
    max_tokens_cap: int = 4096
    """The most tokens one request may ask for; more is a 400."""
    max_body_bytes: int = 1_048_576
    """The largest request body accepted (1 MiB); a larger one is a 413."""
    cors_origins: list[str] = field(default_factory=list)
    """Origins whose pages may call the API from a browser (CORS), e.g. [http://localhost:3000]; empty = CORS
    off (the page served at / needs none)."""
    model_name: Optional[str] = None  # noqa: UP045
    """The model id in /v1/models and in replies; null = the checkpoint's path (or Hugging Face name)."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), cpu, cuda or mps."""
    threads: Any = "auto"
    """CPU threads: auto (time a batched decoding step with 1, 2, 4 … threads and keep the fastest), a
    number, or null (torch's default)."""

    def __post_init__(self) -> None:
        check_threads_setting(self.threads)
        _check_whole(self.port, "port", 0, 65535, "port=8000 (or port=0 for any free port)")
        _check_whole(self.max_batch, "max_batch", 1, 1024, "max_batch=8")
        _check_whole(self.max_queue, "max_queue", 0, 1_000_000, "max_queue=64")
        _check_whole(self.max_tokens_cap, "max_tokens_cap", 1, 10**9, "max_tokens_cap=4096")
        _check_whole(
            self.default_max_tokens, "default_max_tokens", 1, self.max_tokens_cap, "default_max_tokens=256"
        )
        _check_whole(self.max_body_bytes, "max_body_bytes", 1024, 2**31, "max_body_bytes=1048576 (1 MiB)")
        if not isinstance(self.host, str) or not self.host.strip():
            raise GptMiniError(f"host={self.host!r} must be an address; try host=127.0.0.1.")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise GptMiniError("api_key must be a non-empty string, or null for no key.")
        if not all(isinstance(origin, str) and origin for origin in self.cors_origins):
            raise GptMiniError(
                f"cors_origins={list(self.cors_origins)!r} must be a list of origins, e.g. "
                "cors_origins=[http://localhost:3000]."
            )

    @property
    def public(self) -> bool:
        """Whether the address reaches beyond this machine."""
        return self.host not in ("127.0.0.1", "localhost", "::1")


def _check_whole(value: Any, key: str, low: int, high: int, hint: str) -> None:
    """A whole number in low..high, or one line naming the key and a value to try."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise GptMiniError(f"{key}={value!r} must be a whole number in {low}..{high}; try {hint}.")


def register_config() -> None:
    """Register ``ServeConfig`` with Hydra so configs/serve.yaml is checked against it."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=ServeConfig)


def validated(cfg) -> ServeConfig:
    """The config as a checked ``ServeConfig`` (a ServeConfig, Hydra's DictConfig or a mapping)."""
    from gptmini.common import typed_config

    return typed_config(cfg, ServeConfig, "serve")
