"""Per-step-kind speed of CLLM4Rec on real batches: tokens/s, the real-token share and the matmul-rate share.

Used by ``bench_model.py --part steps`` (the default when --backbone names a preset such as
``smollm2`` / ``tiny`` or several precisions are given). For each (precision, layout, step kind) it prints
one JSON line:

    backbone, precision, compile, step (L, C, rec, score), pack, tokens_per_s (REAL input tokens per second),
    processed_tokens_per_s (real + padding), real_token_fraction, matmul_rate_fraction, step_seconds,
    rows_per_step and row_width (the layout model/batch.py chose, averaged over the timed steps), ...

``--pack``: on = the packed layout (model/batch.py ``plan_rows``), longest = the former packed layout (rows as
wide as the longest document of the batch: ``rows_as_wide_as_the_longest``, the same documents re-laid out), off =
one right-padded row per document.

Batches are the loader's own (``CorpusBatches`` over preprocessed shards: ``--data DIR``, or the synthetic
demo dataset preprocessed with the backbone's tokenizer into a temporary folder). L-, C- and rec-steps are
forward + backward + Adam on the trained group; ``score`` is the evaluation forward (prediction prompts,
last-token hidden state, top-100 over the item head) without gradients.

matmul_rate_fraction. Every GEMM the step runs (aten mm / addmm / bmm / baddbmm, recorded with a
TorchDispatchMode in a separate, untimed pass over the same batches) is replayed alone, same shapes,
strides and dtype, on random inputs; the sum over the step's GEMMs of their standalone times is the time
the step would take if it were nothing but GEMMs running at this machine's measured rate for exactly
those shapes. The fraction is that time over the measured step time: 1.0 = the whole step runs at the
machine's matmul rate. (bitsandbytes int8 runs its own kernels, not aten GEMMs: for int8 only the
remaining fp32/bf16 GEMMs count, so its fraction is a lower bound of the matmul share.)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
GEMMS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
BACKBONE_NAMES = {"tiny": "tiny-llama", "smollm2": "smollm2"}


class GemmRecorder(TorchDispatchMode):
    """Counts every GEMM by (op, argument shapes/strides/dtypes)."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GEMMS:
            self.calls[(func, tuple(_meta(a) for a in args), tuple(sorted((kwargs or {}).items())))] += 1
        return func(*args, **(kwargs or {}))


def _meta(arg):
    if isinstance(arg, torch.Tensor):
        return ("tensor", tuple(arg.shape), tuple(arg.stride()), arg.dtype)
    return arg


def _materialise(meta):
    if isinstance(meta, tuple) and meta and meta[0] == "tensor":
        _, shape, stride, dtype = meta
        return torch.empty_strided(shape, stride, dtype=dtype).normal_()
    return meta


def gemm_flops(func, args) -> int:
    shapes = [a[1] for a in args if isinstance(a, tuple) and a and a[0] == "tensor"]
    a, b = shapes[-2], shapes[-1]  # addmm/baddbmm: (input, mat1, mat2)
    if func in (aten.mm.default, aten.addmm.default):
        return 2 * a[0] * a[1] * b[1]
    return 2 * a[0] * a[1] * a[2] * b[2]


def standalone_seconds(calls: Counter, repeats: int = 3) -> tuple[float, int]:
    """(sum over recorded GEMMs of their standalone median time, total GEMM FLOPs)."""
    total, flops = 0.0, 0
    for (func, args, kwargs), count in calls.items():
        inputs = [_materialise(a) for a in args]
        func(*inputs, **dict(kwargs))  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            func(*inputs, **dict(kwargs))
            times.append(time.perf_counter() - start)
        total += count * sorted(times)[len(times) // 2]
        flops += count * gemm_flops(func, args)
    return total, flops


def prepare_data(backbone: str, data: str | None, workdir: str) -> str:
    """A preprocessed dataset: ``data``, or the demo dataset tokenised for ``backbone`` under ``workdir``."""
    if data is not None:
        return data
    from cllm4rec_dist.corpus.preprocess import PreprocessConfig, preprocess
    from cllm4rec_dist.data.demo import DemoConfig, write
    from cllm4rec_dist.data.readers import ReaderOptions

    raw = os.path.join(workdir, "raw")
    write(raw, DemoConfig())
    out = os.path.join(workdir, "data")
    preprocess(PreprocessConfig(format="table", options=ReaderOptions(inputs=[raw]), out=out,
                                backbone=BACKBONE_NAMES.get(backbone, backbone)))
    return out


def load_model(data, precision: str, backbone: str | None, compiled: bool = False):
    from cllm4rec_dist.corpus.presets import resolve_backbone
    from cllm4rec_dist.recommenders.cllm4rec.model import CLLM4Rec, ModelConfig

    recorded = data.manifest["backbone"]
    if backbone in (None, "tiny") or BACKBONE_NAMES.get(backbone) == recorded.get("spec"):
        location = {"path": recorded["path"], "gguf_file": recorded.get("gguf_file")}
    else:
        location = resolve_backbone(backbone)
    if precision in ("int8", "nf4") and location["gguf_file"]:
        # bitsandbytes cannot quantise GGUF weights: convert once into a plain checkpoint (cached)
        from cllm4rec_dist.model.backbone import save_gguf_as_checkpoint

        converted = os.path.join(tempfile.gettempdir(), "cllm4rec-bench-" + location["gguf_file"] + ".hf")
        if not os.path.isdir(converted):
            save_gguf_as_checkpoint(location["path"], location["gguf_file"], converted)
        location = {"path": converted, "gguf_file": None}
    return CLLM4Rec(ModelConfig(backbone=location["path"], gguf_file=location["gguf_file"], precision=precision,
                                num_users=data.num_users, num_items=data.num_items, device="cpu", compile=compiled))


def step_functions(model, data, space, settings, eval_batch_size: int):
    """{kind: (batches, run(batch), real tokens of a batch)} for L, C, rec and score."""
    from cllm4rec_dist.model.batch import pack_rows
    from cllm4rec_dist.model.item_softmax import chunked_topk
    from cllm4rec_dist.recommenders.cllm4rec.batches import CorpusBatches
    from cllm4rec_dist.recommenders.cllm4rec.evaluate import TOP_K
    from cllm4rec_dist.recommenders.cllm4rec.losses import c_step_loss, l_step_loss, rec_step_loss
    from cllm4rec_dist.recommenders.cllm4rec.prompts import prediction_prompts

    groups = model.parameter_groups()
    optimizers = {name: torch.optim.Adam(params, lr=1e-4) for name, params in groups.items()}

    def train(loss_fn, group):
        def run(batch):
            optimizers[group].zero_grad(set_to_none=True)
            loss_fn(model, batch)["loss"].backward()
            optimizers[group].step()
        return run

    eval_docs = data.read_corpus("eval")
    score_batches = [pack_rows(prediction_prompts(eval_docs[s:s + eval_batch_size], space, "rec",
                                                  settings.max_length, settings.seed), settings.pack)
                     for s in range(0, len(eval_docs), eval_batch_size)]

    @torch.no_grad()
    def score(layout):
        chunked_topk(model.last_token_hidden(layout), model.item_head_weight(), TOP_K)

    corpus = {kind: CorpusBatches.for_rank(data, name, space, settings) for kind, name in
              (("L", "collab"), ("C", "content"), ("rec", "rec"))}
    lm_batches = {kind: [b.batch(0, s) for s in range(b.steps_per_epoch)] for kind, b in corpus.items()}
    return {"L": (lm_batches["L"], train(l_step_loss, "collab")),
            "C": (lm_batches["C"], train(c_step_loss, "content")),
            "rec": (lm_batches["rec"], train(rec_step_loss, "collab")),
            "score": (score_batches, score)}


def bench_steps(args, out=sys.stdout) -> list[dict]:
    from cllm4rec_dist.corpus.ids import TokenSpace
    from cllm4rec_dist.corpus.shards import ShardedDataset
    from cllm4rec_dist.model.batch import rows_as_wide_as_the_longest
    from cllm4rec_dist.recommenders.cllm4rec.batches import BatchSettings

    records = []
    with tempfile.TemporaryDirectory() as workdir:
        data = ShardedDataset(prepare_data(args.backbone or "tiny", args.data, workdir))
        space = TokenSpace(data.vocab_size, data.num_users, data.num_items)
        for precision, compiled in [(p, c == "on") for p in args.precision.split(",") for c in args.compile.split(",")]:
            model = load_model(data, precision, args.backbone, compiled)
            for layout in args.pack.split(","):
                settings = BatchSettings(batch_size=args.docs_per_step, max_length=args.max_length,
                                         pack=layout != "off")
                for kind, (batches, run) in step_functions(model, data, space, settings, args.eval_batch).items():
                    if args.kinds and kind not in args.kinds.split(","):
                        continue
                    if layout == "longest":
                        batches = [relayout(batch, rows_as_wide_as_the_longest) for batch in batches]
                    record = time_step(run, batches, args.steps, compiled)
                    records.append({"backbone": args.backbone or data.manifest["backbone"]["path"],
                                    "precision": precision, "compile": compiled, "step": kind, "pack": layout,
                                    "docs_per_step": args.docs_per_step if kind != "score" else args.eval_batch,
                                    **record})
                    print(json.dumps(records[-1]), file=out, flush=True)
            del model
    return records


def relayout(batch, plan):
    """The same documents of ``batch`` laid out by ``plan`` (model/batch.py ``pack_rows``)."""
    from dataclasses import replace

    from cllm4rec_dist.model.batch import pack_rows

    layout = pack_rows([batch.document(k).tolist() for k in range(len(batch.lengths))], plan=plan)
    return replace(batch, input_ids=layout.input_ids, attention_mask=layout.attention_mask,
                   position_ids=layout.position_ids, doc_rows=layout.doc_rows, doc_starts=layout.doc_starts)


def time_step(run, batches, steps: int, compiled: bool = False) -> dict:
    """Times ``steps`` consecutive batches (after one warm-up; compiled: after running each of them once, so that no
    shape compiles while timed), then records their GEMMs untimed (eager: the same GEMMs) and replays them alone."""
    chosen = batches[1:1 + steps] if len(batches) > steps else batches[:steps]
    run(batches[0])
    for batch in chosen if compiled else []:
        run(batch)
    start = time.perf_counter()
    for batch in chosen:
        run(batch)
    seconds = time.perf_counter() - start
    recorder = GemmRecorder()
    with torch.compiler.set_stance("force_eager"), recorder:
        for batch in chosen:
            run(batch)
    gemm_seconds, flops = standalone_seconds(recorder.calls)
    real = sum(int(b.lengths.sum()) for b in chosen)
    processed = sum(b.input_ids.numel() for b in chosen)
    return {"tokens_per_s": round(real / seconds, 1), "processed_tokens_per_s": round(processed / seconds, 1),
            "real_token_fraction": round(real / processed, 3),
            "matmul_rate_fraction": round(gemm_seconds / seconds, 3),
            "rows_per_step": round(sum(b.input_ids.shape[0] for b in chosen) / len(chosen), 1),
            "row_width": round(sum(b.input_ids.shape[1] for b in chosen) / len(chosen), 1),
            "step_seconds": round(seconds / len(chosen), 3), "steps_timed": len(chosen),
            "gemm_gflop_per_step": round(flops / len(chosen) / 1e9, 2),
            "machine_gemm_gflops": round(flops / max(gemm_seconds, 1e-12) / 1e9, 1),
            "step_gemm_gflops": round(flops / seconds / 1e9, 1)}


if __name__ == "__main__":
    sys.exit("run through benchmarks/bench_model.py --part steps")
