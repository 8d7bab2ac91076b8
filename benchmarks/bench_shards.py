"""Shard reading throughput vs what training consumes. Prints JSON.

Why: each training rank reads its own partition of every corpus (shards r, r+W, ...) from the
webdataset shards, through fsspec, once at setup, and then batches it in memory
(cllm4rec_dist/recommenders/cllm4rec/batches.py). If one reader process delivers documents orders of magnitude
faster than a training step eats them, the data path is not the bottleneck and streaming is not
worth its complexity; this measures by how much.

Measured, per reader process (this process, one route at a time):

* ``ShardedDataset.read_corpus`` (every shard verified: size + sha256, then tar + JSON parse);
* ``read_partition(data, corpus, rank 0, --world-readers W)``: what one of W training ranks reads;
* a stock ``webdataset.WebDataset`` pipeline over the same shard URLs (``.map`` JSON decode), both from
  local paths and from an fsspec ``memory://`` copy opened through ``register_fsspec()`` (the route an
  object-store URL takes);
* the trainer's consumption in documents/s per rank: from a run's ``train_log.jsonl`` (``--run``: per
  step ``seconds``, batch size from the run's ``config.yaml``), else by timing a few real C-steps of the
  dataset's own backbone.

    python benchmarks/bench_shards.py --data shards/ml100k-tiny
    python benchmarks/bench_shards.py --data shards/ml100k-tiny --run runs/report-ml100k-tiny/runs/cllm4rec

Memory (``--memory``): writes a synthetic corpus (``--memory-docs`` documents of ``--memory-tokens`` tokens in
webdataset shards of 5,000) to a temporary folder, then, in a fresh Python process per reader (so each peak
is its own), reads one epoch of rank 0's partition in batches through ``PartitionReader``: the in-memory case
(``batch.shuffle_buffer 0``) and the streaming one (``--memory-buffer`` documents). One JSON object per reader:
peak RSS (``ru_maxrss``) and the RSS before reading, the most documents resident, seconds, documents/s.

    python benchmarks/bench_shards.py --memory --memory-docs 100000 --memory-buffer 10000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import posixpath
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cllm4rec_dist.corpus.documents import num_tokens  # noqa: E402
from cllm4rec_dist.corpus.shards import ShardedDataset, register_fsspec  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="preprocessed dataset folder or fsspec URL (required unless --memory)")
    p.add_argument("--memory", action="store_true", help="peak RSS of the in-memory vs the streaming reader instead")
    p.add_argument("--memory-docs", type=int, default=100_000, help="documents of the synthetic corpus")
    p.add_argument("--memory-tokens", type=int, default=128, help="tokens per synthetic document")
    p.add_argument("--memory-buffer", type=int, default=10_000, help="shuffle buffer of the streaming reader")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # internal: one reader, in its own process
    p.add_argument("--corpora", default="collab,content,rec,eval")
    p.add_argument("--world-readers", type=int, default=2, help="W of the read_partition route (rank 0 of W)")
    p.add_argument("--repeats", type=int, default=3, help="reads per measurement; the median is reported")
    p.add_argument("--run", default=None,
                   help="a run folder with train_log.jsonl + config.yaml (else C-steps are timed)")
    p.add_argument("--world", type=int, default=None, help="ranks of that run (default: from its config)")
    p.add_argument("--steps", type=int, default=5, help="timed C-steps when --run is not given (after one warm-up)")
    p.add_argument("--batch-size", type=int, default=16, help="C-step batch when --run is not given")
    p.add_argument("--max-length", type=int, default=256, help="C-step max length when --run is not given")
    return p.parse_args(argv)


def median_seconds(fn, repeats: int):
    """(median seconds, last result) of ``fn()`` over ``repeats`` calls."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def rates(docs: int, tokens: int, seconds: float) -> dict:
    return {"docs": docs, "tokens": tokens, "seconds": round(seconds, 4),
            "docs_per_s": round(docs / seconds, 1), "tokens_per_s": round(tokens / seconds, 1)}


def read_with_sharded_dataset(data: ShardedDataset, corpus: str, repeats: int) -> dict:
    seconds, docs = median_seconds(lambda: data.read_corpus(corpus), repeats)
    return rates(len(docs), sum(num_tokens(d) for d in docs), seconds)


def webdataset_docs(urls: list[str]) -> list[dict]:
    import webdataset as wds

    pipeline = wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(lambda s: json.loads(s["json"]))
    return list(pipeline)


def read_rank_partition(data: ShardedDataset, corpus: str, world: int, repeats: int) -> dict:
    from cllm4rec_dist.recommenders.cllm4rec.batches import read_partition

    seconds, (docs, _) = median_seconds(lambda: read_partition(data, corpus, 0, world), repeats)
    return rates(len(docs), sum(num_tokens(d) for d in docs), seconds)


def read_with_webdataset(urls: list[str], repeats: int) -> dict:
    seconds, docs = median_seconds(lambda: webdataset_docs(urls), repeats)
    return rates(len(docs), sum(num_tokens(d) for d in docs), seconds)


def memory_copy(data: ShardedDataset, corpus: str) -> list[str]:
    """The corpus's shards copied into fsspec's in-memory filesystem; returns their memory:// URLs."""
    import fsspec

    fs = fsspec.filesystem("memory")
    urls = []
    for entry in data.corpus_entry(corpus)["shards"]:
        target = f"/bench_shards/{corpus}/{entry['path']}"
        fs.pipe_file(target, data.fs.cat_file(posixpath.join(data.root, entry["path"])))
        urls.append(f"memory://{target}")
    return urls


def consumption_from_run(run: str, world: int | None) -> dict:
    """Documents/s per rank the trainer consumed, per step kind, from a finished run's log."""
    import yaml

    with open(os.path.join(run, "config.yaml"), encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    if world is None:
        world = cfg["dist"]["num_workers"] if os.path.isdir(os.path.join(run, "ray")) else cfg.get("simulate_ranks", 1)
    batch = cfg["batch"]["batch_size"]
    per_kind: dict[str, dict] = {}
    with open(os.path.join(run, "train_log.jsonl"), encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            k = per_kind.setdefault(rec["kind"], {"steps": 0, "seconds": 0.0})
            k["steps"] += 1
            k["seconds"] += rec["seconds"]
    out = {}
    for kind, k in per_kind.items():
        step_s = k["seconds"] / k["steps"]
        out[kind] = {"steps": k["steps"], "mean_step_seconds": round(step_s, 4),
                     "docs_per_s_per_rank": round(batch / step_s, 1)}
    return {"source": f"{run}/train_log.jsonl", "batch_size_per_rank": batch, "world": world, "per_kind": out}


def consumption_from_c_steps(data: ShardedDataset, steps: int, batch_size: int, max_length: int) -> dict:
    """Time real C-steps (forward + backward + Adam on the content tables) of the dataset's backbone."""
    import torch

    from cllm4rec_dist.corpus.ids import TokenSpace
    from cllm4rec_dist.recommenders.cllm4rec.batches import BatchSettings, CorpusBatches
    from cllm4rec_dist.recommenders.cllm4rec.losses import c_step_loss
    from cllm4rec_dist.recommenders.cllm4rec.model import CLLM4Rec, ModelConfig
    from cllm4rec_dist.train.engines import TorchEngine

    backbone = data.manifest["backbone"]
    torch.manual_seed(0)
    model = CLLM4Rec(ModelConfig(backbone=backbone["path"], gguf_file=backbone.get("gguf_file"),
                                 num_users=data.num_users, num_items=data.num_items, device="cpu"))
    space = TokenSpace(data.vocab_size, data.num_users, data.num_items)
    batches = CorpusBatches.for_rank(data, "content", space,
                                     BatchSettings(batch_size=batch_size, max_length=max_length))
    engine = TorchEngine("content", model.parameter_groups()["content"], 1e-3)
    times, tokens = [], 0
    for step in range(steps + 1):
        batch = batches.batch(0, step % batches.steps_per_epoch)
        start = time.perf_counter()
        out = c_step_loss(model, batch)
        engine.backward(out["loss"])
        engine.step()
        if step:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
            tokens += int(batch.attention_mask.sum())
    step_s = statistics.median(times)
    return {"source": f"{steps} timed C-steps of {backbone.get('spec') or backbone['path']} on CPU",
            "batch_size_per_rank": batch_size, "max_length": max_length, "world": 1,
            "per_kind": {"C": {"steps": steps, "median_step_seconds": round(step_s, 4),
                               "docs_per_s_per_rank": round(batch_size / step_s, 1),
                               "input_tokens_per_s_per_rank": round(tokens / sum(times), 1)}}}


def write_synthetic_corpus(url: str, docs: int, tokens: int) -> None:
    """A content corpus of ``docs`` documents (prompt of 2 ids, ``tokens`` text tokens) in shards of 5,000."""
    from cllm4rec_dist.corpus.shards import DatasetWriter, ShardPlan

    vocab, users, items = 50_000, 10_000, 5_000
    rng = __import__("numpy").random.default_rng(0)

    def documents():
        for k in range(docs):
            user = k % users
            yield {"kind": "content", "user": user, "item": -1, "prompt": [vocab + user, 17],
                   "main": rng.integers(0, vocab, size=tokens).tolist()}

    writer = DatasetWriter(url, ShardPlan(min_shards=1, max_docs_per_shard=5000))
    writer.write_corpus("content", documents(), docs, lambda d: len(d["prompt"]) + len(d["main"]))
    writer.finalize({"num_users": users, "num_items": items, "vocab_size": vocab})


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def read_one_epoch(url: str, buffer: int, batch_size: int = 64) -> dict:
    """One reader in this process: setup (verified read) + one epoch in batches; the peak RSS it reached."""
    import resource

    from cllm4rec_dist.corpus.stream import PartitionReader

    data = ShardedDataset(url)
    before = rss_bytes()
    start = time.perf_counter()
    reader = PartitionReader(data, "content", 0, 1, buffer, key=[0, 0, 0]).verify()
    tokens = 0
    for index in range(0, reader.size, batch_size):
        tokens += sum(len(doc["main"]) for _, doc in reader.take(0, index, min(batch_size, reader.size - index)))
    seconds = time.perf_counter() - start
    return {"reader": "in_memory" if buffer == 0 else "streaming", "shuffle_buffer": buffer, "docs": reader.size,
            "shards": len(reader.parts), "main_tokens": tokens, "rss_before_bytes": before,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "high_water_docs": reader.high_water, "shard_reads": reader.shard_reads, "seconds": round(seconds, 2),
            "docs_per_s": round(reader.size / seconds, 1)}


def memory_comparison(args) -> None:
    """Each reader in a fresh process (its own peak RSS); one JSON line each."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        url = os.path.join(tmp, "synthetic")
        write_synthetic_corpus(url, args.memory_docs, args.memory_tokens)
        for buffer in (0, args.memory_buffer):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--data", url, "--memory-child",
                                  str(buffer)], check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            row["corpus_bytes"] = sum(s["bytes"] for s in ShardedDataset(url).corpus_entry("content")["shards"])
            print(json.dumps(row), flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(read_one_epoch(args.data, int(args.memory_child))))
        return
    if args.memory:
        memory_comparison(args)
        return
    if not args.data:
        raise SystemExit("bench_shards.py: --data is required (or --memory)")
    import torch

    data = ShardedDataset(args.data)
    register_fsspec()
    report = {"data": args.data, "cpu_threads": torch.get_num_threads(), "repeats": args.repeats, "reader": {}}
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON
        for corpus in [c for c in args.corpora.split(",") if c]:
            entry = data.corpus_entry(corpus)
            report["reader"][corpus] = {
                "shards": len(entry["shards"]), "bytes": sum(s["bytes"] for s in entry["shards"]),
                "sharded_dataset": read_with_sharded_dataset(data, corpus, args.repeats),
                f"rank_partition_0_of_{args.world_readers}": read_rank_partition(data, corpus, args.world_readers,
                                                                                 args.repeats),
                "webdataset_local": read_with_webdataset(data.shard_urls(corpus), args.repeats),
                "webdataset_fsspec_memory": read_with_webdataset(memory_copy(data, corpus), args.repeats),
            }
        report["trainer"] = (consumption_from_run(args.run, args.world) if args.run else
                             consumption_from_c_steps(data, args.steps, args.batch_size, args.max_length))
    # Headroom: how many training ranks one reader process could feed at the trainer's fastest step kind.
    fastest = max(k["docs_per_s_per_rank"] for k in report["trainer"]["per_kind"].values())
    report["headroom"] = {
        corpus: {route: round(value["docs_per_s"] / fastest, 1)
                 for route, value in r.items() if isinstance(value, dict)}
        for corpus, r in report["reader"].items()}
    report["headroom_meaning"] = ("reader docs/s (one process) / trainer docs/s per rank at its fastest step kind: "
                                  "how many ranks one reader process could keep fed")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
