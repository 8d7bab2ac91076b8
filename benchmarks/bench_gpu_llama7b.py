"""CLLM4Rec on a LLaMA-7B-shaped backbone on one GPU: L-step and rec-step speed and memory, bf16 and int8.

Why: the paper's LLaMA-7B variant is the configuration a GPU user cares about, and
whether its frozen backbone fits and how fast the tables train does not depend on
the weights' values. So the ``llama-7b-shape`` preset (cllm4rec_dist/corpus/presets.py)
is instantiated with RANDOM weights straight on the GPU (no 13 GB checkpoint on disk),
wrapped in ``CLLM4Rec(config, backbone=...)``, and timed:

* L-step and rec-step: forward + backward + Adam step on the collaborative tables (+ item head), the
  batches of benchmarks/bench_model.py (full rows of ``--seq-len`` tokens, no padding);
* tokens/s = batch x seq_len / median step time (CUDA-synchronised, after warm-up steps);
* peak GPU memory (``torch.cuda.max_memory_allocated`` over the timed steps) and the weights' memory;
* achieved TFLOP/s = 4 x P x tokens / step time, P = parameters of the decoder layers' linear maps. The
  backbone is frozen: the forward pass costs 2P per token and the backward only the activations' gradient,
  another 2P (no weight gradients); attention scores and the item softmax are not counted.

Precisions:

* ``bf16``: the model built in bf16 on the GPU (``from_config(dtype=bfloat16)`` under ``torch.device``).
* ``int8``: bitsandbytes LLM.int8(). Default ``--int8-method convert``: every ``nn.Linear`` of the decoder
  layers of the bf16 model is replaced in place by ``bnb.nn.Linear8bitLt(has_fp16_weights=False,
  threshold=6.0)`` whose ``Int8Params`` are quantised when moved from CPU to the GPU -- what
  transformers' ``replace_with_bnb_linear`` + ``BitsAndBytesConfig(load_in_8bit=True)`` does at load
  time, without the disk round trip; ``lm_head`` and the embeddings stay bf16 (transformers keeps
  ``lm_head`` unquantised too). ``--int8-method reload`` instead saves the bf16 model once to
  ``--tmp-dir`` (~13.5 GB) and loads it through the project's own path,
  ``load_backbone(dir, "int8")`` (transformers + BitsAndBytesConfig; non-quantised weights in fp32),
  then deletes the folder.

    python benchmarks/bench_gpu_llama7b.py                          # H100/A100: bf16 then int8, a few minutes
    python benchmarks/bench_gpu_llama7b.py --batch 4 --seq-len 1024 --precisions bf16
    python benchmarks/bench_gpu_llama7b.py --preset tiny-llama --device cpu --steps 2   # smoke test of the code

Prints one JSON object, then a Markdown table (last). Exits with status 2 and a message at once when
CUDA is not available (unless ``--device cpu`` is asked for, which only makes sense with a small preset).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-7b-shape",
                   help="a preset of cllm4rec_dist/corpus/presets.py (LLaMA family)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test with a small preset only)")
    p.add_argument("--precisions", default="bf16,int8", help="comma-separated: bf16, int8")
    p.add_argument("--int8-method", choices=["convert", "reload"], default="convert")
    p.add_argument("--tmp-dir", default=None, help="where --int8-method reload saves the bf16 checkpoint")
    p.add_argument("--vocab", type=int, default=32000, help="vocab size when the preset does not fix one")
    p.add_argument("--users", type=int, default=10000)
    p.add_argument("--items", type=int, default=10000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind first")
    p.add_argument("--steps", type=int, default=5, help="timed steps of each kind (median reported)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak (e.g. 989 for H100 SXM) to report model FLOPs utilisation")
    return p.parse_args(argv)


def fail_fast(args) -> None:
    """Refuse before any heavy import or allocation when there is no GPU to benchmark."""
    import torch

    def refuse(message: str) -> None:
        print(f"bench_gpu_llama7b.py: {message}", file=sys.stderr)
        sys.exit(2)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        refuse(f"no CUDA GPU is visible (torch.cuda.is_available() is False; torch {torch.__version__}). This "
               "benchmark builds a LLaMA-7B-shaped model (13.5 GB in bf16) and needs a GPU with >= 40 GB; run it "
               "on one. For a smoke test of the code on CPU: --preset tiny-llama --device cpu.")
    if args.device == "cpu" and args.preset == "llama-7b-shape":
        refuse("--device cpu with the 7B preset builds it in bf16 in memory (13.5 GB + the int8 copy); on CPU use "
               "benchmarks/bench_llama7b_cpu.py (the 7B loaded from disk in int8/nf4, ~8 GB), or --preset tiny-llama "
               "(or small-llama) here for a smoke test.")


def llama_config(args):
    """The preset's LlamaConfig: the same one benchmarks/llama_checkpoint.py writes to disk for the CPU benchmark."""
    from llama_checkpoint import llama_config as preset_config

    return preset_config(args.preset, vocab=args.vocab, seq_len=args.seq_len)


def build_bf16(config, device):
    """Random-weight model built directly on ``device`` in bf16 (never materialised in fp32 or on disk)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def decoder_linears(model):
    """(parent module, attribute, nn.Linear) of every linear map in the decoder layers (not lm_head)."""
    import torch

    out = []
    for _name, module in model.model.layers.named_modules():
        for attr, child in module.named_children():
            if type(child) is torch.nn.Linear:
                out.append((module, attr, child))
    return out


def convert_to_int8(model, device):
    """Replace the decoder's nn.Linear by bitsandbytes Linear8bitLt in place, quantising on the move to ``device``.

    ``Int8Params`` quantise (row-wise absmax, LLM.int8()) when moved from CPU to another device, so each
    bf16 weight goes GPU -> CPU -> quantised on the GPU, one layer at a time (peak: one layer on the CPU).
    """
    import bitsandbytes as bnb
    import torch

    targets = decoder_linears(model)
    while targets:  # pop, so that each bf16 weight is freed as soon as it is replaced
        parent, attr, linear = targets.pop()
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  has_fp16_weights=False, threshold=6.0, device="meta")
        weight = linear.weight.detach().to("cpu", dtype=torch.float16)
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)
        if linear.bias is not None:
            new.bias = torch.nn.Parameter(linear.bias.detach().to(device, torch.float16), requires_grad=False)
        setattr(parent, attr, new)
        del linear, weight
    model.is_loaded_in_8bit = True
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


def reload_as_int8(model, args, device):
    """Save the bf16 model once and load it through the project's int8 path (transformers + BitsAndBytesConfig)."""
    from cllm4rec_dist.model.backbone import load_backbone

    tmp = tempfile.mkdtemp(prefix="llama7b-shape-", dir=args.tmp_dir)
    try:
        model.save_pretrained(tmp)  # the bf16 model stays on the GPU meanwhile (13.5 + ~8 GB at the peak)
        return load_backbone(tmp, "int8", device=device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def release(*objects) -> None:
    import torch

    for obj in objects:
        del obj
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def matmul_params(backbone) -> int:
    """P of the FLOP estimate: weights of the decoder layers' linear maps (int8 weights count the same)."""
    total = 0
    for _, _, linear in decoder_linears(backbone):
        total += linear.in_features * linear.out_features
    for module in backbone.model.layers.modules():
        if type(module).__name__ == "Linear8bitLt":
            total += module.in_features * module.out_features
    return total


def synchronize(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step, args, device) -> dict:
    import torch

    for _ in range(args.warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    out = {"median_step_seconds": round(sorted(times)[len(times) // 2], 4),
           "all_step_seconds": [round(t, 4) for t in times]}
    if device.type == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def bench_precision(backbone, precision: str, args, device) -> dict:
    """Wrap ``backbone`` in CLLM4Rec and time its L-step and rec-step."""
    import torch
    from bench_model import make_batches

    from cllm4rec_dist.recommenders.cllm4rec.losses import l_step_loss, rec_step_loss
    from cllm4rec_dist.recommenders.cllm4rec.model import CLLM4Rec, ModelConfig

    torch.manual_seed(0)
    model = CLLM4Rec(ModelConfig(backbone=f"random:{args.preset}", num_users=args.users, num_items=args.items,
                                 precision=precision, device=str(device)), backbone=backbone)
    l_batch, _, rec_batch, _ = make_batches(model, args, device)
    params = model.parameter_groups()["collab"]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    weights_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None

    def make_step(loss_fn, batch):
        def step():
            optimizer.zero_grad(set_to_none=True)
            out = loss_fn(model, batch)
            out["loss"].backward()
            optimizer.step()
            if not torch.isfinite(out["loss"]):
                raise FloatingPointError(f"{precision}: non-finite loss {float(out['loss'])}")
        return step

    tokens = args.batch * args.seq_len
    p = matmul_params(backbone)
    result = {"precision": precision, "decoder_matmul_params": p,
              "trainable_params": sum(x.numel() for x in params),
              "weights_and_tables_gib": None if weights_gib is None else round(weights_gib, 2)}
    for name, loss_fn, batch in (("l_step", l_step_loss, l_batch), ("rec_step", rec_step_loss, rec_batch)):
        timing = time_step(make_step(loss_fn, batch), args, device)
        seconds = timing["median_step_seconds"]
        tflops = 4 * p * tokens / seconds / 1e12
        timing.update(tokens_per_step=tokens, tokens_per_s=round(tokens / seconds, 1), achieved_tflops=round(tflops, 2))
        if args.peak_tflops:
            timing["mfu"] = round(tflops / args.peak_tflops, 4)
        result[name] = timing
    return result


def table(results: list[dict]) -> str:
    lines = ["| precision | step | tokens/s | step (s) | peak GPU (GiB) | TFLOP/s (4·P·tokens) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['precision']} | — | error: {r['error'][:80]} | | | |")
            continue
        for step in ("l_step", "rec_step"):
            t = r[step]
            lines.append(f"| {r['precision']} | {step} | {t['tokens_per_s']:,.0f} | {t['median_step_seconds']:.3f} | "
                         f"{t.get('peak_gib', '—')} | {t['achieved_tflops']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    fail_fast(args)
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    precisions = [p for p in args.precisions.split(",") if p]
    unknown = set(precisions) - {"bf16", "int8"}
    if unknown:
        sys.exit(f"--precisions: unknown {sorted(unknown)}; choose bf16, int8")
    precisions = [p for p in ("bf16", "int8") if p in precisions]  # int8 is made FROM the bf16 model
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "preset": args.preset, "batch": args.batch, "seq_len": args.seq_len,
              "users": args.users, "items": args.items, "steps": args.steps, "warmup": args.warmup,
              "int8_method": args.int8_method, "results": []}
    config = llama_config(args)
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON and the table
        start = time.perf_counter()
        backbone = build_bf16(config, device)
        report["build_seconds"] = round(time.perf_counter() - start, 1)
        report["backbone_params"] = sum(p.numel() for p in backbone.parameters())
        for precision in precisions:
            try:
                if precision == "int8":
                    start = time.perf_counter()
                    if args.int8_method == "convert":
                        backbone = convert_to_int8(backbone, device)
                    else:
                        backbone = reload_as_int8(backbone, args, device)
                    report["int8_quantise_seconds"] = round(time.perf_counter() - start, 1)
                    report["int8_quantised_linears"] = sum(type(m).__name__ == "Linear8bitLt"
                                                           for m in backbone.modules())
                report["results"].append(bench_precision(backbone, precision, args, device))
            except Exception as error:  # report and go on: one precision failing must not hide the other
                report["results"].append({"precision": precision, "error": f"{type(error).__name__}: {error}"})
            release()
    print(json.dumps(report, indent=2))
    print()
    print(table(report["results"]))
    return 0 if all("error" not in r for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
