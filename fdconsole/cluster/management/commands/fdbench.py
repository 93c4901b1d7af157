"""``manage.py fdbench KIND``: benchmarks that print their figures (JSON, last line on stdout).

Progress goes to stderr. A benchmark never asserts; it measures.
"""

from __future__ import annotations

import json

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = ("Run a benchmark and print its figures as one JSON object (model, engine, scheduler, splitwise, "
            "skew, handoff, serve, chaos).")

    def add_arguments(self, parser) -> None:
        sub = parser.add_subparsers(dest="kind", required=True)
        model = sub.add_parser("model", help="load time, prefill latency and decode tokens/s of a model, "
                                             "beside transformers' generate when installed")
        model.add_argument("--model", default=None, help="tiny, smollm2 or a path (default: FD_MODEL)")
        model.add_argument("--batch", default="1,16", help="batch sizes, comma-separated (default 1,16)")
        model.add_argument("--prompt-tokens", type=int, default=128)
        model.add_argument("--max-tokens", type=int, default=128)
        model.add_argument("--repeats", type=int, default=3)
        model.add_argument("--device", default=None, help="default: FD_DEVICE")
        model.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: FD_DTYPE)")
        model.add_argument("--no-reference", action="store_true", help="do not time transformers")
        engine = sub.add_parser("engine", help="the batching engine alone, against the static-batch bound")
        engine.add_argument("--concurrency", default="1,8,16,32", help="levels, comma-separated")
        engine.add_argument("--prompt-tokens", type=int, default=32)
        engine.add_argument("--max-tokens", type=int, default=64)
        engine.add_argument("--requests-per-client", type=int, default=4)
        engine.add_argument("--repeats", type=int, default=3,
                            help="runs per level, each beside a static batch; the fastest of each counts")
        engine.add_argument("--device", default=None, help="default: FD_DEVICE")
        skew = sub.add_parser("skew", help="real nodes, all requests on one node: makespan over ideal")
        skew.add_argument("--nodes", type=int, default=4)
        skew.add_argument("--requests", type=int, default=200)
        skew.add_argument("--work-ms", type=float, default=100.0,
                          help="fixed work of each request, ms (default 100: a short generation)")
        handoff = sub.add_parser("handoff", help="KV-cache handoff from a prefill to a decode node")
        handoff.add_argument("--prompt-tokens", type=int, default=128)
        handoff.add_argument("--repeats", type=int, default=50)
        handoff.add_argument("--device", default="cpu")
        scheduler = sub.add_parser("scheduler", help="the scheduler interface alone, no-op engine")
        scheduler.add_argument("--scheduler", default="local", choices=["local", "global", "splitwise"])
        scheduler.add_argument("--requests", type=int, default=10_000)
        splitwise = sub.add_parser("splitwise", help="scheduler --scheduler splitwise: the same workload")
        splitwise.add_argument("--requests", type=int, default=10_000)
        serve = sub.add_parser("serve", help="a load through a running console's HTTP API and SSE streams")
        serve.add_argument("--api", default="native", choices=["native", "openai"])
        serve.add_argument("--requests", type=int, default=100, help="requests per concurrency level")
        serve.add_argument("--concurrency", default="1,4,16", help="levels, comma-separated (default 1,4,16)")
        serve.add_argument("--max-tokens", type=int, default=64)
        serve.add_argument("--plot", default=None, metavar="FILE",  # FILE.png: matplotlib; else SVG
                           help="also chart tokens/s and TTFT against concurrency: FILE.png (TTFT p50 "
                                "and p99, matplotlib), else an SVG (TTFT p50)")
        serve.add_argument("--url", default="http://127.0.0.1:8000", help="the running console")
        serve.add_argument("--topic", default="default")
        serve.add_argument("--prompt", default=None, help="default: a short text prompt")
        serve.add_argument("--token", default=None,
                           help="default: FD_API_TOKEN, else a temporary token minted here, deleted after")
        chaos = sub.add_parser("chaos", help="a steady load while nodes, the console, Redis and the database "
                                             "are hurt: what was lost or duplicated")
        chaos.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10)")
        chaos.add_argument("--rate", type=float, default=2.0, help="requests a second (default 2)")
        chaos.add_argument("--nodes", type=int, default=2)
        chaos.add_argument("--fault-every", type=float, default=15.0,
                           help="seconds between faults (default 15)")
        chaos.add_argument("--max-tokens", type=int, default=32)
        chaos.add_argument("--database-url", default=None,
                           help="the cluster's database (default: a SQLite file of its own, deleted after)")

    def handle(self, *args, **options) -> None:
        try:
            figures = getattr(self, f"bench_{options['kind']}")(options)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(json.dumps(figures))

    def bench_model(self, options) -> dict:
        import torch

        from fdconsole.cluster.serve_bench import parse_levels
        from gpu_worker.bench import bench_model

        if settings.FD_TORCH_THREADS > 0:
            torch.set_num_threads(settings.FD_TORCH_THREADS)  # as a node runs
        return bench_model(model=options["model"] or settings.FD_MODEL,
                           device=options["device"] or settings.FD_DEVICE,
                           batches=parse_levels(options["batch"], "--batch"),
                           prompt_tokens=options["prompt_tokens"], max_tokens=options["max_tokens"],
                           repeats=options["repeats"],
                           dtype=options["dtype"] or settings.FD_DTYPE or None,
                           reference=not options["no_reference"])

    def bench_engine(self, options) -> dict:
        import torch

        from fdconsole.cluster.serve_bench import parse_levels
        from gpu_worker.engine_bench import bench_engine

        device = options["device"] or settings.FD_DEVICE
        if settings.FD_TORCH_THREADS > 0:
            torch.set_num_threads(settings.FD_TORCH_THREADS)  # as a node runs
        return bench_engine(device=device, concurrency=parse_levels(options["concurrency"]),
                            prompt_tokens=options["prompt_tokens"], max_tokens=options["max_tokens"],
                            requests_per_client=options["requests_per_client"], repeats=options["repeats"])

    def bench_skew(self, options) -> dict:
        from fdconsole.cluster.skew import bench_skew

        if options["nodes"] < 2 or options["requests"] < 1 or options["work_ms"] <= 0:
            raise CommandError("--nodes must be at least 2, --requests at least 1, --work-ms above 0")
        return bench_skew(options["nodes"], options["requests"], options["work_ms"], self.stderr.write)

    def bench_handoff(self, options) -> dict:
        from gpu_worker.handoff_bench import MAX_TOKENS, bench_handoff
        from gpu_worker.model import GPTConfig

        most = GPTConfig().block_size - MAX_TOKENS
        if not 1 <= options["prompt_tokens"] <= most or options["repeats"] < 1:
            raise CommandError(f"--prompt-tokens must be 1 to {most} (the model's context, less "
                               f"{MAX_TOKENS} to decode); --repeats at least 1")
        return bench_handoff(settings.FD_REDIS_URL, options["prompt_tokens"], repeats=options["repeats"],
                             device=options["device"])

    def bench_splitwise(self, options) -> dict:
        return self.bench_scheduler({**options, "scheduler": "splitwise"})

    def bench_scheduler(self, options) -> dict:
        from scheduler.bench import bench_scheduler, redis_bench_topic

        if options["requests"] < 1:
            raise CommandError("--requests must be at least 1")
        if options["scheduler"] == "local":
            return bench_scheduler("local", options["requests"])
        name = options["scheduler"]
        with redis_bench_topic(settings.FD_REDIS_URL, name) as (redis, config):
            from scheduler.interface import create_scheduler

            scheduler = create_scheduler(config, redis=redis, node="bench-node")
            try:
                return bench_scheduler(name, options["requests"], scheduler=scheduler)
            finally:
                scheduler.close()

    def bench_serve(self, options) -> dict:
        from fdconsole.cluster.serve_bench import DEFAULT_PROMPT, ServeBenchError, bench_serve, parse_levels
        from fdconsole.cluster.serve_plot import write_plot

        levels = parse_levels(options["concurrency"])
        if options["requests"] < 1 or options["max_tokens"] < 1:
            raise CommandError("--requests and --max-tokens must be at least 1")
        try:
            figures = bench_serve(api=options["api"], url=options["url"], token=options["token"],
                                  topic=options["topic"], prompt=options["prompt"] or DEFAULT_PROMPT,
                                  max_tokens=options["max_tokens"], num_requests=options["requests"],
                                  levels=levels, log=self.stderr.write)
        except ServeBenchError as exc:
            raise CommandError(str(exc)) from None
        if options["plot"]:
            title = f"fdbench serve --api {options['api']}"
            self.stderr.write(f"wrote {write_plot(options['plot'], figures['results'], title)}")
        return figures

    def bench_chaos(self, options) -> dict:
        from fdconsole.cluster.chaos import ChaosError, bench_chaos

        if options["minutes"] <= 0 or options["rate"] <= 0 or options["fault_every"] <= 0:
            raise CommandError("--minutes, --rate and --fault-every must be above 0")
        if options["nodes"] < 1 or options["max_tokens"] < 1:
            raise CommandError("--nodes and --max-tokens must be at least 1")
        try:
            return bench_chaos(minutes=options["minutes"], rate=options["rate"], nodes=options["nodes"],
                               fault_every=options["fault_every"], max_tokens=options["max_tokens"],
                               database_url=options["database_url"], log=self.stderr.write)
        except ChaosError as exc:
            raise CommandError(str(exc)) from None
