"""`coordinator serve`, as a reusable object: model, workers, plan, shards, API server."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import protos
from coordinator.api.http_api import HttpServer
from coordinator.api.service import InferenceService, set_serving, start_server, watch_health
from coordinator.cluster.cluster import Cluster
from coordinator.cluster.membership import Membership
from coordinator.cluster.modelinfo import ModelInfo, check_family, read_model_info, resolve_model
from coordinator.cluster.planner import DEFAULT_PREFIX_CACHE_TOKENS
from coordinator.local import LocalWorkers, memory_each, sharing_note
from coordinator.serving.engine import (
    DEFAULT_MAX_WAITING,
    DEFAULT_PREFILL_CHUNK,
    DEFAULT_RECOVER_TIMEOUT,
    Engine,
)
from coordinator.serving.metrics import CoordinatorMetrics
from coordinator.serving.speculation import (
    DraftProposer,
    NgramProposer,
    Speculator,
    drafts_ahead,
)
from protos import auth, tls
from protos.units import format_size

log = logging.getLogger("shardline.coordinator")

# gRPC services open without an API key: health checks (load balancers, Kubernetes) and
# reflection (the schema, which protos/ publishes anyway)
OPEN_GRPC = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass
class ServeOptions:
    """Everything `coordinator serve` needs; the CLI fills it from flags."""

    model: str | None = None
    demo: bool = False
    workers: list[str] = field(default_factory=list)
    local_workers: int = 0
    local_memory: list[int] | None = None
    host: str = "0.0.0.0"
    grpc_port: int = 50051
    http_port: int = 8080
    partition: str = "memory"
    cluster: str = "default"
    context: int | None = None
    max_sequences: int = 4
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    max_waiting: int = DEFAULT_MAX_WAITING
    prefix_cache_tokens: int = DEFAULT_PREFIX_CACHE_TOKENS
    cache_dir: Path | None = None
    # discovery (docs/discovery.md); the CLI browses by default, an embedded Coordinator not
    discover: bool = False
    min_workers: int = 1
    discover_timeout: float | None = None
    interface: str | None = None
    rebalance: bool = True
    recover_timeout: float = DEFAULT_RECOVER_TIMEOUT  # 0: a lost worker fails its requests
    worker_wait: float = 0.0  # seconds --workers may take to answer at start (the CLI: 120)
    secret: bytes | None = field(default=None, repr=False)  # the cluster secret (protos/auth)
    api_key: str | None = field(default=None, repr=False)  # clients must send it as a bearer
    tls: Any = field(default=None, repr=False)  # protos.tls.TLS: mutual TLS, APIs over TLS
    # speculative decoding (docs/speculation.md): a draft model, or "ngram" (prompt lookup)
    draft_model: str | None = None
    speculative: str | None = None
    num_draft_tokens: int = 3


def load_tokenizer(path: Path):
    """The model's tokenizer exactly as mlx_lm.load builds it (same EOS ids)."""
    from mlx_lm.tokenizer_utils import load as load_tok

    config = json.loads((path / "config.json").read_text())
    eos = config.get("eos_token_id")
    return load_tok(path, eos_token_ids=[eos] if isinstance(eos, int) else eos)


class Coordinator:
    """Owns the local workers, the cluster, the engine and the API server of one `serve`."""

    def __init__(self, options: ServeOptions, progress: Callable[[str], None] = print) -> None:
        self.options = options
        self.progress = progress
        self.local: LocalWorkers | None = None
        self.model: ModelInfo | None = None
        self.cluster: Cluster | None = None
        self.membership: Membership | None = None
        self.engine: Engine | None = None
        self.server = None
        self.health = None
        self.grpc_port = 0
        self.metrics = CoordinatorMetrics()
        self.metrics.watch(self)
        self.http: HttpServer | None = None
        self.http_port = 0
        self._health_task: asyncio.Task | None = None
        self.draft: DraftProposer | None = None

    def resolve_model(self) -> ModelInfo:
        opts = self.options
        if opts.demo:
            from coordinator.demo import DEMO_SPEC, cached_model

            self.progress("building the demo model (cached after the first run)...")
            path = cached_model(DEMO_SPEC, opts.cache_dir)
            model_id = "shardline-demo"
        elif opts.model:
            path = resolve_model(opts.model, opts.cache_dir)
            model_id = Path(opts.model).name if Path(opts.model).is_dir() else opts.model
        else:
            raise ValueError("no model: pass --model DIR_OR_REPO or --demo")
        info = read_model_info(path, model_id=model_id)
        check_family(info)
        return info

    def start_local_workers(self) -> list[str]:
        opts = self.options
        count = opts.local_workers or (2 if opts.demo and not opts.workers else 0)
        if not count:
            return []
        memory = opts.local_memory
        if memory is None:
            from worker.backend import detect

            memory = [memory_each(detect().memory_bytes, count, os.environ)] * count
        note = sharing_note(count, os.environ)
        if note:
            log.warning(note)
        self.progress(f"starting {count} local worker(s)...")
        self.local = LocalWorkers(count, memory=memory, cache_dir=opts.cache_dir,
                                  secret=opts.secret)
        return self.local.start()

    async def start(self) -> None:
        from worker.backend import tune_allocator

        opts = self.options
        tune_allocator()  # shard chunks: worker/backend.py
        tls.use(opts.tls)  # channels to workers present this certificate
        self.model = self.resolve_model()
        limit = self.model.max_prefill_chunk(protos.DEFAULT_MAX_MESSAGE_BYTES)
        if not 1 <= opts.prefill_chunk <= limit:
            raise ValueError(
                f"--prefill-chunk {opts.prefill_chunk}: must be 1 to {limit} for this model "
                f"(a chunk's activations, {self.model.hidden_size} x {self.model.activation_bytes}"
                f" bytes a token, must fit the {format_size(protos.DEFAULT_MAX_MESSAGE_BYTES)} "
                f"gRPC message limit)")
        addresses = list(opts.workers) + self.start_local_workers()
        if not addresses and not opts.discover:
            raise ValueError("no workers: pass --workers HOST:PORT,... or --local-workers N")
        self.membership = Membership(
            cluster=opts.cluster, discover=opts.discover, min_workers=opts.min_workers,
            timeout=opts.discover_timeout, interface=opts.interface, rebalance=opts.rebalance,
            progress=self.progress, secret=opts.secret, worker_wait=opts.worker_wait,
        )
        self.cluster = Cluster(
            self.model, await self.membership.gather(addresses), partition=opts.partition,
            context=opts.context, max_sequences=opts.max_sequences,
            prefix_cache_tokens=max(0, opts.prefix_cache_tokens), secret=opts.secret,
            cache_dir=opts.cache_dir, metrics=self.metrics,
        )
        plan = self.cluster.make_plan()
        self.progress(plan.describe())
        if self.cluster.lanes < len(plan.stages):
            self.progress(f"the {len(plan.stages)} workers share devices that compute "
                          f"{self.cluster.lanes} step(s) at once: running streams decode in "
                          f"{self.cluster.lanes} microbatch(es)")
        service = InferenceService(None, self.cluster)
        await self.start_api(service)
        self.progress(f"loading {self.model.model_id} on {len(plan.stages)} worker(s)...")
        await self.cluster.load(self.progress)
        self.metrics.replans.labels("initial").inc()
        config = json.loads((self.model.path / "config.json").read_text())
        speculator = await self.start_speculation(int(config["vocab_size"]))
        self.engine = Engine(
            load_tokenizer(self.model.path), self.cluster, vocab_size=int(config["vocab_size"]),
            context=plan.context, prefill_chunk=opts.prefill_chunk,
            max_running=plan.max_sequences, max_waiting=opts.max_waiting,
            prefix_cache_tokens=opts.prefix_cache_tokens if self.cluster.forkable else 0,
            metrics=self.metrics, recover_timeout=opts.recover_timeout,
            speculator=speculator,
        )
        service.engine = self.engine
        await set_serving(self.health, True)
        self.progress(f"serving {self.model.model_id} on gRPC {opts.host}:{self.grpc_port}, "
                      f"HTTP {opts.host}:{self.http_port}")
        await self.membership.watch(self)

    async def start_speculation(self, vocab_size: int) -> Speculator | None:
        """The proposer `--draft-model` or `--speculative ngram` asks for (or None)."""
        opts = self.options
        if opts.draft_model and opts.speculative:
            raise ValueError("--draft-model and --speculative ngram: choose one")
        if not (opts.draft_model or opts.speculative):
            return None
        if not self.cluster.forkable:
            self.progress("speculative decoding is off: this model's sliding-window caches "
                          "cannot go back over rejected proposals")
            return None
        if opts.speculative == "ngram":
            proposer: Any = NgramProposer()
            what = "prompt lookup"
        else:
            path = resolve_model(opts.draft_model, opts.cache_dir)
            draft_vocab = json.loads((path / "config.json").read_text()).get("vocab_size")
            if load_tokenizer(path).get_vocab() != load_tokenizer(self.model.path).get_vocab():
                raise ValueError(f"--draft-model {opts.draft_model}: its tokenizer is not the "
                                 "served model's (the same token ids must mean the same text)")
            if draft_vocab != vocab_size:
                self.progress(f"draft vocabulary {draft_vocab}, model {vocab_size}: proposals "
                              "outside the draft's are never made")
            self.draft = DraftProposer(path)
            await self.draft.load()
            what = f"draft model {opts.draft_model}"
        self.progress(f"speculative decoding: {what}, up to {opts.num_draft_tokens} tokens "
                      "per step")
        if opts.speculative:
            return Speculator(proposer, opts.num_draft_tokens, self.metrics)
        draft, cluster = self.draft, self.cluster

        def ahead() -> bool:  # the workers of the plan now (a re-plan may change them)
            return drafts_ahead(draft.device, (w.info.device for w in cluster.workers))

        self.progress("the draft drafts each next round during the check" if ahead() else
                      "the draft shares a GPU with a stage: it drafts each round when asked "
                      "(SHARDLINE_DRAFT_AHEAD=1 drafts the next during the check)")
        return Speculator(draft, opts.num_draft_tokens, self.metrics, ahead)

    async def start_api(self, service: InferenceService) -> None:
        """gRPC and HTTP up before the shards load; health says NOT_SERVING until they have."""
        opts = self.options
        interceptors = [self.metrics.interceptor]  # first: refused calls are counted too
        if opts.api_key:
            interceptors.append(auth.api_key_auth(opts.api_key, OPEN_GRPC))
        self.server, self.health, self.grpc_port = await start_server(
            service, opts.host, opts.grpc_port, interceptors=interceptors,
            credentials=opts.tls.server_credentials(require_client_cert=False)
            if opts.tls else None)
        self.http = HttpServer(self, opts.host, opts.http_port, opts.tls)
        self.http_port = self.http.port
        await self.http.start()
        self._health_task = asyncio.create_task(watch_health(self.health, self))

    async def drain(self, grace: float) -> None:
        """Shut down gently: report NOT_SERVING, refuse new requests, let the running ones
        finish for up to `grace` seconds (then `stop` cancels the rest)."""
        if self.engine is None:
            return
        self.engine.draining = True  # health follows it (NOT_SERVING, HTTP 503)
        running = self.engine.scheduler.running + self.engine.scheduler.waiting
        if running:
            self.progress(f"draining: {running} request(s) may finish within {grace:g}s")
        left = await self.engine.drain(grace)
        if left:
            self.progress(f"{left} request(s) did not finish in {grace:g}s: cancelled")

    async def stop(self) -> None:
        tls.use(None)
        if self._health_task is not None:
            self._health_task.cancel()
        if self.membership is not None:
            await self.membership.close()
        if self.http is not None:
            await self.http.stop()
        if self.server is not None:
            await self.server.stop(grace=1.0)
        if self.cluster is not None:
            await self.cluster.close()
        if self.local is not None:
            self.local.stop()
        if self.draft is not None:
            self.draft.close()
