"""CLLM4Rec and A-LLMRec on a LLaMA-7B-shaped backbone loaded from disk, on CPU: load time, step speed, memory.

Why: the product promise is a frozen 8-bit LLaMA-7B backbone under the trainable tables. bench_gpu_llama7b.py
builds the 7B model in GPU memory and never touches the loader; this benchmark takes the path a user's downloaded
LLaMA-7B folder takes, at full size, on the CPU:

1. A random LLaMA-7B-shaped checkpoint (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32,000; bf16
   safetensors, one shard per layer, + a small byte-level BPE tokenizer) is written once to ``--checkpoint``
   (default runs/llama7b/random-checkpoint, 13.5 GB; benchmarks/llama_checkpoint.py: shard by shard, atomic, reused).
2. The CLLM4Rec authors' Amazon Beauty split (10,553 users x 6,086 items: the tables at the paper's Beauty size,
   real document lengths) is preprocessed once with that tokenizer into ``--data``.
3. For each precision (``int8``, ``nf4``), in a fresh child process (its own peak memory), one after the other:
   * the recipe (recommenders/cllm4rec/recipe.py ``CLLM4RecRecipe.setup``: ``build_model`` ->
     model/backbone.py ``load_backbone`` -> transformers ``from_pretrained`` + bitsandbytes) with torch Adam engines
     (the reference trainer's; the DeepSpeed path is the launcher's, see docs/ARCHITECTURE.md);
   * ``--steps`` steps of each kind L, C and rec through ``Trainer.train_step`` (batch -> loss -> backward ->
     update), the recipe's own batches (``--batch`` documents of at most ``--max-length`` tokens);
   * ``--allmrec-steps`` A-LLMRec stage-2 steps on the SAME backbone object: ``LLMAlignment`` (its trainable
     projections F_U, F_I around the frozen LLM) on prompts of ``ALLMRecPrompts`` (Beauty item tags as titles,
     histories from the Beauty interactions, 20 candidates), the body of ``ALLMRecTrainer.llm_step``. Its inputs
     are stand-ins: user vectors from a RANDOMLY INITIALISED small SASRec (stage 0 is not trained) and random joint
     item embeddings in place of stage 1's (SBERT is not loaded). Speed and memory of stage 2 do not depend on
     those values.

Per precision the JSON has ``load_seconds``, ``peak_rss_bytes`` (the process's VmHWM, which counts the
memory-mapped checkpoint pages during loading), ``peak_private_bytes`` (the highest anonymous resident set,
RssAnon, sampled every 20 ms), ``trainable_bytes``, per step kind ``step_seconds`` (each step, and the median)
and ``tokens_per_s`` (real tokens of the step's batch / its median seconds), and ``memory_model``
(cllm4rec_dist/model/memory.py: every term, the predicted private peak and measured/predicted, and the bound of the
resident-set peak, which adds the memory-mapped checkpoint pages the kernel may or may not have dropped).

    python benchmarks/bench_llama7b_cpu.py                         # 7B: writes 13.5 GB once, ~8 GB per child
    python benchmarks/bench_llama7b_cpu.py --precisions int8 --steps 1 --allmrec-steps 1
    python benchmarks/bench_llama7b_cpu.py --preset tiny-llama --checkpoint /tmp/tiny --data /tmp/tiny-data  # seconds

Needs ~8.5 GB of free memory per int8 child and ~5 GB per nf4 child (private), and the page cache to map the
13.5 GB checkpoint while it loads (clean file pages the kernel can drop). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, ".."))
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from llama_checkpoint import BEAUTY_SOURCE, DEFAULT_CHECKPOINT, prepare_beauty, write_random_checkpoint  # noqa: E402

KINDS = ("L", "C", "rec")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-7b-shape", help="a LLaMA preset (corpus/presets.py)")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="folder of the random checkpoint (reused)")
    p.add_argument("--data", default=None, help="preprocessed Beauty folder (default: <checkpoint>-beauty, reused)")
    p.add_argument("--beauty", default=BEAUTY_SOURCE, help="the authors' Beauty split (npz matrices + item_tags.json)")
    p.add_argument("--precisions", default="int8,nf4", help="comma-separated: int8, nf4 (fp32, bf16 also work)")
    p.add_argument("--batch", type=int, default=2, help="documents per step")
    p.add_argument("--max-length", type=int, default=64, help="tokens per document at most")
    p.add_argument("--steps", type=int, default=2, help="steps of each kind L, C, rec")
    p.add_argument("--allmrec-steps", type=int, default=2, help="A-LLMRec stage-2 steps (0 = none)")
    p.add_argument("--allmrec-batch", type=int, default=1, help="A-LLMRec stage-2 prompts per step")
    p.add_argument("--allmrec-history", type=int, default=3,
                   help="items of the history in an A-LLMRec prompt (the paper's 10 make ~700-token prompts)")
    p.add_argument("--allmrec-candidates", type=int, default=5, help="candidates in an A-LLMRec prompt (paper: 20)")
    p.add_argument("--title-tags", type=int, default=1, help="Beauty tags that make an item's title")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- memory measurement ---------------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class PrivatePeak:
    """The highest RssAnon (anonymous resident memory: what the process itself allocated, no file pages) seen by a
    sampling thread; the kernel keeps only the peak of the whole resident set (VmHWM)."""

    def __init__(self, interval: float = 0.02):
        self.peak = _status_bytes("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, _status_bytes("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_bytes("RssAnon"))
        return self.peak


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- one precision, in a child process -----------------------------------------------------------


def run_child(args) -> dict:
    import bitsandbytes  # noqa: F401  (imported by the load anyway: counted in the runtime term)

    from cllm4rec_dist.config import config_from_dict
    from cllm4rec_dist.recommenders.cllm4rec.recipe import CLLM4RecRecipe
    from cllm4rec_dist.train.checkpoint import LocalSink
    from cllm4rec_dist.train.engines import TorchEngine
    from cllm4rec_dist.train.rank import Rank

    precision = args.child
    runtime = _status_bytes("RssAnon")  # the interpreter and libraries, before any model exists
    sampler = PrivatePeak()
    out_dir = tempfile.mkdtemp(prefix="bench-llama7b-run-")
    cfg = config_from_dict({"data": args.data, "backbone": args.checkpoint, "out": out_dir, "projector_sample": 0,
                            "log_every": 1000, "model": {"precision": precision},
                            "batch": {"batch_size": args.batch, "max_length": args.max_length}}, "bench_llama7b_cpu")

    def engine_factory(name, params, lr):
        return TorchEngine(name, params, lr, cfg.optim.weight_decay, cfg.optim.grad_clip)

    start = time.perf_counter()
    recipe = CLLM4RecRecipe(cfg, Rank(0, 1), engine_factory, LocalSink(out_dir, 1)).setup()
    result = {"precision": precision, "load_seconds": round(time.perf_counter() - start, 1),
              "after_load_peak_rss_bytes": peak_rss_bytes(), "after_load_private_bytes": _status_bytes("RssAnon"),
              "runtime_private_bytes": runtime}
    trainer, model = recipe.trainer, recipe.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    result["trainable_bytes"] = sum(p.numel() * p.element_size() for p in trainable)
    result["backbone_bytes"] = model.backbone.get_memory_footprint()
    biggest = {"tokens": 0, "longest_row": 0, "rows": 0}
    steps = {}
    for kind in KINDS:
        times, tokens, losses = [], [], []
        for _ in range(args.steps):
            stream = trainer.batches[kind][0]
            epoch, step = divmod(trainer.state.counters[kind], stream.steps_per_epoch)
            batch = stream.batch(epoch, step)
            real = int(batch.lengths.sum())
            if real > biggest["tokens"]:
                biggest = {"tokens": real, "longest_row": int(batch.input_ids.shape[1]),
                           "rows": int(batch.input_ids.shape[0])}
            t0 = time.perf_counter()
            out = trainer.train_step(kind)
            losses.append(float(out["loss"]))
            times.append(time.perf_counter() - t0)
            tokens.append(real)
            print(f"[{precision}] {kind}-step {len(times)}/{args.steps}: {times[-1]:.1f} s, {real} tokens, "
                  f"loss {losses[-1]:.3f}", file=sys.stderr, flush=True)
        median = sorted(times)[len(times) // 2]
        steps[kind] = {"step_seconds": round(median, 2), "all_step_seconds": [round(t, 2) for t in times],
                       "tokens_per_step": tokens, "tokens_per_s": round(sum(tokens) / sum(times), 2),
                       "losses": [round(x, 4) for x in losses]}
    extra_trainable = 0
    if args.allmrec_steps:
        steps["allmrec_stage2"], extra_trainable, shape = allmrec_steps(model.backbone, args, precision)
        if shape["tokens"] > biggest["tokens"]:
            biggest = shape
    result["steps"] = steps
    result["largest_batch"] = biggest
    result["peak_private_bytes"] = sampler.stop()
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["memory_model"] = predicted(model, precision, cfg, runtime, biggest, extra_trainable, result)
    return result


def allmrec_steps(backbone, args, precision: str) -> tuple[dict, int, dict]:
    """A-LLMRec stage-2 steps (the body of ALLMRecTrainer.llm_step) on ``backbone``; see the module doc for what
    is a stand-in. Returns (timings, trainable parameters, the largest batch's shape)."""
    import numpy as np
    import scipy.sparse as sp
    import torch

    from cllm4rec_dist.corpus.presets import load_tokenizer
    from cllm4rec_dist.model.cf import CF_MODELS, pad_histories
    from cllm4rec_dist.recommenders.allmrec.model import LLMAlignment, SoftBatch
    from cllm4rec_dist.recommenders.allmrec.prompts import ALLMRecPrompts
    from cllm4rec_dist.recommenders.allmrec.settings import ALLMRecSettings
    from cllm4rec_dist.recommenders.allmrec.trainer import sample_unseen

    settings = ALLMRecSettings(prompt_history=args.allmrec_history, num_candidates=args.allmrec_candidates)
    train = sp.load_npz(os.path.join(args.beauty, "train_matrix.npz")).tocsr()
    with open(os.path.join(args.beauty, "item_tags.json"), encoding="utf-8") as f:
        tags = json.load(f)
    num_items = train.shape[1]
    titles = [", ".join(tags[str(j)][:args.title_tags]) for j in range(num_items)]
    torch.manual_seed(0)
    cf = CF_MODELS[settings.cf_model](num_items, settings.cf_stage_settings(0).model_settings())  # random: stand-in
    cf.eval()
    joint = torch.randn(num_items, settings.text_dim)  # stand-in for stage 1's joint item embeddings
    llm = LLMAlignment(backbone, cf.dim, settings.text_dim)
    prompts = ALLMRecPrompts(load_tokenizer({"path": args.checkpoint, "gguf_file": None}), titles)
    params = llm.projection_parameters()
    optimizer = torch.optim.Adam(params, lr=1e-4)

    generator = np.random.default_rng(0)
    users = [u for u in range(train.shape[0]) if train.indptr[u + 1] - train.indptr[u] >= 2]
    times, tokens, losses = [], [], []
    shape = {"tokens": 0, "longest_row": 0, "rows": 0}
    for step in range(args.allmrec_steps):
        chosen = [users[int(k)] for k in generator.choice(len(users), args.allmrec_batch, replace=False)]
        pairs, histories = [], []
        for user in chosen:
            items = train.indices[train.indptr[user]:train.indptr[user + 1]].tolist()
            history, target = items[:-1], items[-1]
            candidates = [target, *sample_unseen(generator, num_items, set(items), settings.num_candidates - 1)]
            pairs.append((prompts.prompt(history[-settings.prompt_history:], candidates), prompts.answer(target)))
            histories.append(history)
        batch = SoftBatch.collate([p for p, _ in pairs], [a for _, a in pairs], prompts.fill_id)
        with torch.no_grad():
            vectors = cf.user_representation(pad_histories(histories, settings.cf_max_len))
        real = int(batch.attention_mask.sum())
        if real > shape["tokens"]:
            shape = {"tokens": real, "longest_row": int(batch.input_ids.shape[1]), "rows": len(chosen)}
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        out = llm.answer_loss(batch, vectors, joint)
        out["loss"].backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
        tokens.append(real)
        losses.append(float(out["loss"].detach()))
        print(f"[{precision}] A-LLMRec stage-2 step {step + 1}/{args.allmrec_steps}: {times[-1]:.1f} s, {real} tokens, "
              f"loss {losses[-1]:.3f}", file=sys.stderr, flush=True)
    median = sorted(times)[len(times) // 2]
    timing = {"step_seconds": round(median, 2), "all_step_seconds": [round(t, 2) for t in times],
              "tokens_per_step": tokens, "tokens_per_s": round(sum(tokens) / sum(times), 2),
              "losses": [round(x, 4) for x in losses], "stand_ins": "random SASRec user vectors, random joint item "
              "embeddings (stage 0 and 1 not trained)"}
    return timing, sum(p.numel() for p in params), shape


def predicted(model, precision: str, cfg, runtime: int, biggest: dict, extra_trainable: int, measured: dict) -> dict:
    from cllm4rec_dist.model.memory import DecoderShape, TableShape, rank_memory

    shape = DecoderShape.of(model.backbone.config)
    tables = TableShape(model.config.num_users, model.config.num_items, shape.hidden, model.item_head is not None)
    estimate = rank_memory(shape, precision, tables, runtime=runtime, tokens=biggest["tokens"],
                           longest_row=biggest["longest_row"], rows=biggest["rows"],
                           extra_trainable=extra_trainable).as_dict()
    estimate["measured_over_predicted_private"] = round(measured["peak_private_bytes"] / estimate["private_peak"], 3)
    estimate["peak_rss_within_bound"] = measured["peak_rss_bytes"] <= estimate["rss_peak_bound"]
    return estimate


# ---- the driver ---------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    args.data = args.data or args.checkpoint.rstrip("/") + "-beauty"
    if args.child:
        print(json.dumps(run_child(args)), flush=True)
        return 0
    precisions = [p for p in args.precisions.split(",") if p]
    unknown = set(precisions) - {"fp32", "bf16", "int8", "nf4"}
    if unknown:
        sys.exit(f"--precisions: unknown {sorted(unknown)}; choose int8, nf4, bf16, fp32")
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON's; preprocessing prints its progress
        checkpoint = write_random_checkpoint(args.preset, args.checkpoint)
        data = prepare_beauty(args.beauty, args.data, args.checkpoint)
    report = {"preset": args.preset, "checkpoint": args.checkpoint,
              "checkpoint_bytes": checkpoint["total_bytes"], "checkpoint_params": checkpoint["params"],
              "checkpoint_reused": checkpoint["reused"], "checkpoint_seconds": round(time.perf_counter() - start, 1),
              "data": data, "batch": args.batch,
              "max_length": args.max_length, "steps": args.steps, "allmrec_steps": args.allmrec_steps,
              "allmrec_prompt": {"history": args.allmrec_history, "candidates": args.allmrec_candidates,
                                 "title_tags": args.title_tags},
              "cpus": os.cpu_count(), "load_average_before": os.getloadavg(), "results": []}
    for precision in precisions:
        command = [sys.executable, os.path.abspath(__file__), "--child", precision]
        for name in ("preset", "checkpoint", "data", "beauty", "batch", "max_length", "steps", "allmrec_steps",
                     "allmrec_batch", "allmrec_history", "allmrec_candidates", "title_tags"):
            command += ["--" + name.replace("_", "-"), str(getattr(args, name))]
        child = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
        if child.returncode != 0 or not lines:
            report["results"].append({"precision": precision, "error": f"child exited with {child.returncode}"})
            continue
        report["results"].append(json.loads(lines[-1]))
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    return 0 if all("error" not in r for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
