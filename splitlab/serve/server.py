"""``splitlab serve``: load a model, start the mode's online engine, serve it with uvicorn.

It listens on 127.0.0.1 by default; any other ``--host`` prints a warning (without
``--api-key`` anyone who reaches the port can use the model). ``--port 0`` takes a free
port; the line ``splitlab serve: listening on http://HOST:PORT/v1`` says which, once the
model is loaded, warmed up and the socket bound (stdout, flushed).

SIGINT / SIGTERM: the server stops accepting connections, ends every request in flight
(their streams end with ``finish_reason`` "abort"; with ``--drain`` they finish first, for
at most ``--drain-timeout`` seconds), stops the engine thread and exits with status 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from typing import Any

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``(host, port)`` (port 0: any free one)."""
    from splitlab.errors import ConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port "
                          "(0 takes a free one)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``splitlab serve``."""
    from splitlab.cli import _positive_float, _positive_int, _split_flags

    p.add_argument("--model", default=None, help="tiny | smollm2-135m | dummy:<arch> | folder | HF id "
                                                 "(default: smollm2-135m on CPU, a real-shape dummy on GPU)")
    p.add_argument("--mode", default="serial", choices=("serial", "chunked", "split", "replicas"),
                   help="the online engine: serial, chunked, split (a prefill and a decode worker, as "
                        "--backend says), or replicas (--replicas engines, each request to one)")
    p.add_argument("--host", default=LOOPBACK, help="address to listen on (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free one; printed when listening)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if visible)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 CPU, bf16 GPU)")
    p.add_argument("--seed", type=int, default=0, help="weights seed of random-weight models")
    p.add_argument("--max-seq-len", type=_positive_int, default=2048, help="context per KV slot (prompt + output)")
    p.add_argument("--num-slots", type=_positive_int, default=None, help="KV slots (default: sized by the engine)")
    p.add_argument("--max-batch", type=_positive_int, default=64, help="most sequences decoding at once")
    p.add_argument("--chunk-size", type=_positive_int, default=512, help="chunked mode: tokens per step")
    p.add_argument("--token-budget", type=_positive_int, default=8192, help="serial mode: prompt tokens per step")
    p.add_argument("--max-tokens-limit", type=_positive_int, default=None,
                   help="most tokens one request may ask for (default: what the context leaves)")
    p.add_argument("--max-body-bytes", type=_positive_int, default=None, help="largest request body (default 1 MiB)")
    p.add_argument("--max-queued", type=_positive_int, default=None,
                   help="most requests waiting or running (more get 503; default 4096)")
    p.add_argument("--kv-block-size", type=_positive_int, default=None, help="KV page size (default: slots)")
    _split_flags(p)
    r = p.add_argument_group("replicas mode", "independent engines on one GPU (ReplicaConfig)")
    r.add_argument("--replicas", type=_positive_int, default=None, help="how many engines (default 2)")
    r.add_argument("--replica-engine", choices=("serial", "chunked"), default=None, help="each one's engine")
    r.add_argument("--replica-mps", action="store_true", help="run the replicas under a private MPS daemon")
    p.add_argument("--drain", action="store_true", help="on SIGINT/SIGTERM finish requests in flight first")
    p.add_argument("--drain-timeout", type=_positive_float, default=60.0, help="seconds --drain may take")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)


def engine_options(args) -> dict[str, Any]:
    """``split=`` / ``replicas=`` of the online engine from the flags; a flag of another mode is refused."""
    from splitlab.cli import _split_options
    from splitlab.config import SplitConfig
    from splitlab.errors import ConfigError
    from splitlab.modes.replicas import ReplicaConfig

    split = _split_options(args)  # refuses split flags outside --mode split
    given = {k: v for k, v in (("num_replicas", args.replicas), ("engine", args.replica_engine),
                               ("mps", args.replica_mps or None)) if v is not None}
    if given and args.mode != "replicas":
        raise ConfigError("--replicas, --replica-engine and --replica-mps apply to --mode replicas only")
    if args.mode == "split":
        return {"split": SplitConfig(**split)}
    if args.mode == "replicas":
        return {"replicas": ReplicaConfig(**given)}
    return {}


GIL_SWITCH_INTERVAL_S = 0.0005


def cmd_serve(args) -> int:
    from splitlab.cli import _quiet_transformers, default_model
    from splitlab.config import EngineConfig
    from splitlab.api import online_engine
    from splitlab.engine.online import MAX_QUEUED
    from splitlab.models import load_model
    from splitlab.serve.app import MAX_BODY_BYTES, ServerSettings, create_app

    _quiet_transformers()
    if not is_loopback(args.host):
        print(f"splitlab serve: warning: listening on {args.host} makes the model reachable from the network"
              f"{'' if args.api_key else ' without an API key (give --api-key)'}", file=sys.stderr, flush=True)
    sock = bind_socket(args.host, args.port)  # before the model loads: a taken port fails at once
    engine = None
    try:
        spec = args.model or default_model()
        model = load_model(spec, device=args.device, dtype=args.dtype, seed=args.seed)
        config = EngineConfig(max_seq_len=args.max_seq_len, num_slots=args.num_slots, max_batch=args.max_batch,
                              chunk_size=args.chunk_size, token_budget=args.token_budget,
                              kv_block_size=args.kv_block_size)
        engine = online_engine(model, args.mode, config, max_queued=args.max_queued or MAX_QUEUED,
                               **engine_options(args))
        name = args.served_model_name or spec
        settings = ServerSettings(served_model_name=name, aliases=(spec,), api_key=args.api_key,
                                  max_body_bytes=args.max_body_bytes or MAX_BODY_BYTES,
                                  max_tokens_limit=args.max_tokens_limit)
        app = create_app(engine, model.tokenizer, settings)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"splitlab serve: {name} ({args.mode}, {model.device}) listening on http://{shown}:{port}/v1",
              flush=True)
        # The engine thread drops the GIL at each CUDA sync; under the default 5 ms switch interval
        # a busy event loop (one SSE event per token per stream) holds it back for up to 5 ms a step.
        # On the H200 (serial, 16 req/s): HTTP ITL p50 11.9 ms at 5 ms (results/serve_h200_gil5ms.json),
        # 6.9 ms at 0.5 ms (results/serve_h200.json) against 6.3 ms in-process.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        _run(app, sock, engine, args)
    finally:
        if engine is not None:
            engine.close(abort=True)
        sock.close()
    print("splitlab serve: stopped", flush=True)
    return 0


def _run(app, sock: socket.socket, engine, args) -> None:
    import uvicorn

    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=args.drain_timeout if args.drain else 5.0)
    server = _server_class()(config, engine, drain=args.drain)
    server.run(sockets=[sock])


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, whose first exit signal also ends (or drains) the engine's requests,
        and which exits normally instead of re-raising the signal after shutting down."""

        def __init__(self, config, engine, drain: bool):
            super().__init__(config)
            self.engine, self.drain = engine, drain

        def handle_exit(self, sig: int, frame: Any) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            getattr(self, "_captured_signals", []).clear()  # exit 0 here; uvicorn would re-raise the signal
            if first:
                self.engine.close(abort=not self.drain, wait=False)

    return Server
