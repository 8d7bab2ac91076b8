"""Benchmark of the CLLM4Rec model: step throughput and the memory of the item-space softmax. Prints JSON.

(a) tokens/s of the L-, C- and rec-steps (forward + backward + Adam step on the tables), each against
    ITS baseline: a plain forward + backward of the same frozen backbone on the same tokens
    (inputs_embeds requiring grad) plus the same-size dense softmax (``cross_entropy(hidden @ W.T)``
    over the same target positions and the same number of classes: J items for L and rec, V vocab
    tokens for C; W trainable where the step trains it, the item head, frozen for the vocab head).
    What a step does beyond its baseline (routing ids to the tables, the MR term, the Adam update)
    is the overhead that ``time_ratio_vs_baseline`` measures.
(b) peak memory of the item-space loss (forward + backward, hidden (N,d) and item table (J,d) both
    trainable) at 10k / 100k / 1M items, chunked (``sparse_softmax_nll``) vs the dense
    ``cross_entropy(hidden @ W.T)``.
    Method: on CUDA, ``torch.cuda.max_memory_allocated`` after a reset, minus the memory allocated
    before the loss. On CPU, each case runs in its own SUBPROCESS: peak RSS (VmHWM, whose mark is
    reset through /proc/self/clear_refs right before the loss, so imports and input creation do not
    count) minus the RSS just before the loss, with the address space capped (RLIMIT_AS) at the
    pre-loss size + ``--memory-limit-gb`` so that an allocation beyond it fails with an error ("oom")
    instead of swapping or meeting the machine's OOM killer. (tracemalloc does not see torch's allocator.)
    Both count everything the loss allocates: logits, their gradient, and the dense (J,d) weight gradient.

    python benchmarks/bench_model.py                       # tiny random LLaMA, CPU, a couple of minutes
    python benchmarks/bench_model.py --device cuda --hidden 1024 --positions 2048
    python benchmarks/bench_model.py --backbone DIR        # a real checkpoint instead of the random one
    python benchmarks/bench_model.py --shape smollm2 --part throughput   # SmolLM2-135M's shapes, random weights

(c) per step kind on real batches (benchmarks/step_kinds.py): one JSON line per (precision, layout, step)
    with tokens/s, the real-token fraction and the fraction of the machine's matmul rate:
    python benchmarks/bench_model.py --backbone smollm2 --precision fp32,bf16 [--data SHARDS] [--pack on,longest,off]
    python benchmarks/bench_model.py --backbone tiny --precision fp32,bf16,int8
    python benchmarks/bench_model.py --backbone smollm2 --precision bf16 --compile off,on --kinds L,C,rec
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
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import cllm4rec_dist  # noqa: E402,F401  before torch: sets OMP_WAIT_POLICY as the CLI does (see its docstring)
from cllm4rec_dist.model.batch import LMBatch, RecBatch  # noqa: E402
from cllm4rec_dist.model.item_softmax import DEFAULT_MAX_LOGIT_ELEMENTS, sparse_softmax_nll  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_kinds  # noqa: E402

# Random-backbone shapes: LlamaConfig fields (None = from --hidden/--layers/--vocab).
SHAPES = {
    "args": None,
    "smollm2": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True},  # SmolLM2-135M
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--part", choices=["auto", "all", "throughput", "memory", "steps"], default="auto",
                   help="auto: 'steps' when --backbone is a name (tiny, smollm2) or several precisions are given, "
                        "else 'all' (throughput + memory)")
    # (a) throughput
    p.add_argument("--backbone", default=None, help="local checkpoint dir; default: a random LLaMA of the sizes below")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--precision", default="fp32",
                   help="fp32, bf16, int8 or nf4; the steps part takes a comma-separated list")
    p.add_argument("--shape", choices=sorted(SHAPES), default="args",
                   help="random backbone: 'args' = the sizes below (heads = hidden/32, MLP 4 x hidden); 'smollm2' = "
                        "SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536, vocab 49,152, "
                        "tied embeddings) with random weights")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (random backbone, and the memory part)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--items", type=int, default=10000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5,
                   help="timed rounds (one step of each kind per round, after a warm-up round); medians reported")
    # (b) memory
    p.add_argument("--positions", type=int, default=256, help="N: rows of hidden states in the item loss")
    p.add_argument("--item-counts", default="10000,100000,1000000")
    p.add_argument("--max-logit-elements", type=int, default=DEFAULT_MAX_LOGIT_ELEMENTS)
    p.add_argument("--memory-limit-gb", type=float, default=4.0, help="CPU: cap on what one case may allocate")
    p.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)  # internal: "items,chunked"
    add_step_arguments(p)
    args = p.parse_args(argv)
    for precision in args.precision.split(","):
        if precision not in ("fp32", "bf16", "int8", "nf4"):
            p.error(f"--precision {precision!r}: choose from fp32, bf16, int8, nf4")
    for mode in args.compile.split(","):
        if mode not in ("off", "on"):
            p.error(f"--compile {mode!r}: choose from off, on (or off,on)")
    for layout in args.pack.split(","):
        if layout not in ("on", "longest", "off"):
            p.error(f"--pack {layout!r}: choose from on, longest, off")
    if args.part == "auto":
        named = args.backbone in step_kinds.BACKBONE_NAMES
        args.part = "steps" if named or "," in args.precision else "all"
    return args


def add_step_arguments(p):
    """(c) per step kind on real batches (benchmarks/step_kinds.py)."""
    g = p.add_argument_group("steps part")
    g.add_argument("--data", default=None,
                   help="preprocessed shards; default: the demo dataset tokenised for --backbone")
    g.add_argument("--pack", default="on",
                   help="comma-separated layouts: on (packed rows sized by the batch's total length), longest (the "
                        "former packed rows, as wide as the longest document), off (one right-padded row per document)")
    g.add_argument("--docs-per-step", type=int, default=16, help="documents per L/C/rec step (batch.batch_size)")
    g.add_argument("--eval-batch", type=int, default=64, help="users per scoring batch (eval.batch_size)")
    g.add_argument("--max-length", type=int, default=1024)
    g.add_argument("--kinds", default=None, help="subset of L,C,rec,score")
    g.add_argument("--compile", default="off",
                   help="off, on, or off,on: the backbone's decoder layers eager and/or torch.compile'd "
                        "(model.compile); each compiled case first runs every batch it times once, untimed, so that "
                        "the compilation of each shape is not timed")


# ---- (a) throughput ------------------------------------------------------------------------------

def make_batches(model, args, device):
    """Full rows (no padding) of seq_len tokens: an L-, a C- and a rec-batch and the vocab ids of the baseline."""
    gen = torch.Generator().manual_seed(0)
    V, num_users, J, B, T = model.vocab_size, model.num_users, model.num_items, args.batch, args.seq_len
    users = torch.randint(0, num_users, (B,), generator=gen)
    user_tokens = (V + users)[:, None]
    vocab = lambda n: torch.randint(1, V, (B, n), generator=gen)  # noqa: E731
    items = lambda n: V + num_users + torch.randint(0, J, (B, n), generator=gen)  # noqa: E731
    full = torch.ones(B, T, dtype=torch.long)
    lengths = torch.full((B,), T)

    l_ids = torch.cat([user_tokens, vocab(3), items(T - 4)], dim=1)
    l_batch = LMBatch(l_ids, full, torch.full((B,), 4), lengths)
    c_ids = torch.cat([user_tokens, vocab(2), items(1), vocab(T - 4)], dim=1)
    c_batch = LMBatch(c_ids, full, torch.full((B,), 4), lengths)
    rec_ids = torch.cat([user_tokens, vocab(3), items(T - 8), user_tokens, vocab(3)], dim=1)
    held_out = 5
    rec_batch = RecBatch(rec_ids, full, lengths, users, torch.arange(B).repeat_interleave(held_out),
                         torch.randint(0, J, (B * held_out,), generator=gen))
    plain_ids = vocab(T)
    return l_batch.to(device), c_batch.to(device), rec_batch.to(device), plain_ids.to(device)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_step_seconds(steps: dict, rounds: int, device) -> dict:
    """Median seconds per step of each named step, timed ROUND-ROBIN (one step of each kind per round)
    so that load from other processes on a shared machine hits all kinds alike."""
    times = {name: [] for name in steps}
    for step in steps.values():  # warm-up
        step()
    for _ in range(rounds):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def save_random_backbone(args, directory: str) -> None:
    """A random LLaMA of ``--shape`` (or ``--hidden/--layers/--vocab``) saved to ``directory`` (seeded: the same
    every time)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(1, args.hidden // 32)
    shape = SHAPES[getattr(args, "shape", "args")] or {
        "hidden_size": args.hidden, "intermediate_size": 4 * args.hidden, "num_hidden_layers": args.layers,
        "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": args.vocab,
        "tie_word_embeddings": False}
    config = LlamaConfig(max_position_embeddings=max(args.seq_len, 128), **shape)
    LlamaForCausalLM(config).save_pretrained(directory)


def build_model(args, device):
    """CLLM4Rec over ``--backbone`` or a random LLaMA of ``--hidden/--layers/--vocab`` (also bench_scaling.py's)."""
    from cllm4rec_dist.recommenders.cllm4rec.model import CLLM4Rec, ModelConfig

    with tempfile.TemporaryDirectory() as tmp:
        backbone_dir = args.backbone
        if backbone_dir is None:
            save_random_backbone(args, tmp)
            backbone_dir = tmp
        return CLLM4Rec(ModelConfig(backbone=backbone_dir, gguf_file=args.gguf_file, precision=args.precision,
                                    num_users=args.users, num_items=args.items, device=str(device),
                                    table_sharding=getattr(args, "table_sharding", "replicated"),
                                    item_head_sharding=getattr(args, "item_head_sharding", "replicated")))


def bench_throughput(args, device):
    from cllm4rec_dist.recommenders.cllm4rec.losses import c_step_loss, l_step_loss, rec_step_loss
    from cllm4rec_dist.train.engines import TorchEngine

    model = build_model(args, device)
    l_batch, c_batch, rec_batch, plain_ids = make_batches(model, args, device)
    batches = {"l_step": l_batch, "c_step": c_batch, "rec_step": rec_batch}
    num_tokens = args.batch * args.seq_len
    # the trainer's own engine (train/engines.py): clipping, Adam step, zeroed gradients
    engines = {name: TorchEngine(name, params, lr=1e-3, grad_clip=1.0)
               for name, params in model.parameter_groups().items()}

    def train_step(loss_fn, batch, side):
        def step():
            engines[side].backward(loss_fn(model, batch)["loss"])
            engines[side].step()
        return step

    seconds = median_step_seconds({
        **{f"baseline_{name}": step for name, step in baseline_steps(model, batches, plain_ids).items()},
        "l_step": train_step(l_step_loss, batches["l_step"], "collab"),
        "c_step": train_step(c_step_loss, batches["c_step"], "content"),
        "rec_step": train_step(rec_step_loss, batches["rec_step"], "collab"),
    }, args.steps, device)
    result = {"baseline": BASELINE_DEFINITION}
    for name in batches:
        baseline = seconds[f"baseline_{name}"]
        result[name] = {"tokens_per_s": round(num_tokens / seconds[name], 1),
                        "baseline_tokens_per_s": round(num_tokens / baseline, 1),
                        "time_ratio_vs_baseline": round(seconds[name] / baseline, 3)}
    shape = SHAPES[args.shape]
    random_backbone = (f"random LLaMA of SmolLM2-135M's shape ({shape})" if shape else
                       f"random LLaMA hidden={args.hidden} layers={args.layers} vocab={args.vocab}")
    return {"backbone": args.backbone or random_backbone,
            "precision": args.precision, "users": args.users, "items": args.items,
            "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps, **result}


BASELINE_DEFINITION = ("per step: forward + backward of the same frozen backbone on the same (B, T) tokens "
                       "(vocab embeddings as inputs_embeds requiring grad) + dense cross_entropy(hidden @ W.T) over "
                       "the step's target positions and class count (L: J items, W trainable; C: V vocab, W frozen; "
                       "rec: J items from the last prompt token, multi-hot, W trainable); no optimizer step")


def baseline_steps(model, batches: dict, plain_ids: torch.Tensor) -> dict:
    """The floor of each step kind: the same backbone forward + backward on the same tokens, plus the
    same-size DENSE softmax (logits materialised, torch's own cross-entropy), nothing else."""
    import torch.nn.functional as F

    from cllm4rec_dist.recommenders.cllm4rec.losses import _next_token_targets

    embeddings = model.backbone.get_input_embeddings()
    gen = torch.Generator().manual_seed(1)
    item_head = (0.02 * torch.randn(model.num_items, model.hidden_size, generator=gen)).to(plain_ids.device)
    item_head.requires_grad_()
    vocab_head = model.vocab_head_weight().detach().float()

    def backbone_hidden():
        embeds = embeddings(plain_ids).detach().requires_grad_()
        return model.backbone.base_model(inputs_embeds=embeds,
                                         attention_mask=torch.ones_like(plain_ids)).last_hidden_state

    def next_token_step(batch, head):
        rows, positions = _next_token_targets(batch)
        targets = torch.randint(0, head.shape[0], rows.shape, generator=gen).to(rows.device)

        def step():
            item_head.grad = None
            hidden = backbone_hidden()
            F.cross_entropy(hidden[rows, positions].float() @ head.T, targets).backward()
        return step

    def rec_step():
        batch = batches["rec_step"]
        item_head.grad = None
        hidden = backbone_hidden()
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch.lengths - 1]
        log_probs = torch.log_softmax(last.float() @ item_head.T, dim=1)
        (-log_probs[batch.target_rows, batch.target_items].sum() / hidden.shape[0]).backward()

    return {"l_step": next_token_step(batches["l_step"], item_head),
            "c_step": next_token_step(batches["c_step"], vocab_head),
            "rec_step": rec_step}


# ---- (b) memory of the item-space loss -----------------------------------------------------------

def item_loss(hidden, weight, targets, chunked, max_logit_elements):
    if chunked:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return sparse_softmax_nll(hidden, weight, rows, targets, max_logit_elements=max_logit_elements) / len(rows)
    return torch.nn.functional.cross_entropy(hidden @ weight.T, targets)


def item_loss_inputs(args, num_items, device):
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(args.positions, args.hidden, generator=gen, device=device).requires_grad_()
    weight = (0.02 * torch.randn(num_items, args.hidden, generator=gen, device=device)).requires_grad_()
    targets = torch.randint(0, num_items, (args.positions,), generator=gen, device=device)
    return hidden, weight, targets


def proc_status_bytes(field):
    """VmRSS / VmHWM (peak RSS) / VmSize of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def memory_case_cpu_child(args):
    """Runs in its own process: one (items, chunked) case; prints one JSON line."""
    items, chunked = args.memory_case.split(",")
    items, chunked = int(items), chunked == "1"
    # first use of the kernels (BLAS, oneDNN, unique, ...) outside the measurement: a small case through
    # the one-buffer and the chunked path alike
    small = item_loss_inputs(args, 1000, torch.device("cpu"))
    for budget in (args.max_logit_elements, args.positions * 100):
        item_loss(*small, chunked, budget).backward()
    del small
    hidden, weight, targets = item_loss_inputs(args, items, torch.device("cpu"))
    # reset the kernel's peak-RSS mark (VmHWM) so imports and input creation do not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = proc_status_bytes("VmRSS")
    limit = proc_status_bytes("VmSize") + int(args.memory_limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    start = time.perf_counter()
    try:
        item_loss(hidden, weight, targets, chunked, args.max_logit_elements).backward()
    except (RuntimeError, MemoryError) as error:
        print(json.dumps({"peak_mb": "oom", "error": str(error).splitlines()[0][:200]}))
        return
    seconds = time.perf_counter() - start
    peak = proc_status_bytes("VmHWM")
    print(json.dumps({"peak_mb": round((peak - before) / 2**20, 1), "seconds": round(seconds, 3)}))


def memory_case(args, items, chunked, device):
    if device.type == "cuda":
        hidden, weight, targets = item_loss_inputs(args, items, device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        try:
            item_loss(hidden, weight, targets, chunked, args.max_logit_elements).backward()
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            del hidden, weight, targets
            torch.cuda.empty_cache()
            return {"peak_mb": "oom"}
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device)
        del hidden, weight, targets
        torch.cuda.empty_cache()
        return {"peak_mb": round((peak - before) / 2**20, 1), "seconds": round(seconds, 3)}
    command = [sys.executable, os.path.abspath(__file__), "--memory-case", f"{items},{int(chunked)}",
               "--hidden", str(args.hidden), "--positions", str(args.positions),
               "--max-logit-elements", str(args.max_logit_elements), "--memory-limit-gb", str(args.memory_limit_gb)]
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"peak_mb": "oom" if proc.returncode in (-9, 137) else "error",
                "returncode": proc.returncode, "stderr": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def bench_memory(args, device):
    cases = []
    for items in [int(n) for n in args.item_counts.split(",")]:
        for chunked in (True, False):
            case = {"items": items, "chunked": chunked, **memory_case(args, items, chunked, device)}
            # what is inherent to the problem: the (J,d) weight gradient; and the dense logits alone
            case["weight_grad_mb"] = round(items * args.hidden * 4 / 2**20, 1)
            case["dense_logits_mb"] = round(items * args.positions * 4 / 2**20, 1)
            cases.append(case)
    method = ("torch.cuda.max_memory_allocated minus allocated before the loss" if device.type == "cuda" else
              "subprocess per case: peak RSS (VmHWM, reset through /proc/self/clear_refs just before the loss) "
              "after forward+backward minus RSS before the loss; "
              f"address space capped at +{args.memory_limit_gb} GB so larger allocations fail as 'oom'")
    return {"method": method, "hidden": args.hidden, "positions": args.positions,
            "max_logit_elements": args.max_logit_elements, "cases": cases,
            "chunked_vs_dense": chunked_vs_dense(cases, args)}


def chunked_vs_dense(cases: list[dict], args) -> dict:
    """Per catalogue size: our loss's peak against its bound (the (J,d) weight gradient + one chunk of
    ``max_logit_elements`` fp32 logits) and its time against the dense loss's, where the dense one ran."""
    chunk_mb = args.max_logit_elements * 4 / 2**20
    out = {}
    for items in sorted({c["items"] for c in cases}):
        ours = next(c for c in cases if c["items"] == items and c["chunked"])
        dense = next(c for c in cases if c["items"] == items and not c["chunked"])
        row = {"bound_mb": round(ours["weight_grad_mb"] + min(chunk_mb, ours["dense_logits_mb"]), 1),
               "path": "one buffer (logits fit)" if items * args.positions <= args.max_logit_elements else "chunked"}
        if isinstance(ours.get("peak_mb"), float):
            row["peak_over_bound"] = round(ours["peak_mb"] / row["bound_mb"], 3)
        if "seconds" in ours and "seconds" in dense:
            row["time_over_dense"] = round(ours["seconds"] / dense["seconds"], 3)
        out[str(items)] = row
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.memory_case is not None:
        memory_case_cpu_child(args)
        return
    if args.part == "steps":
        json_out = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):  # library prints go to stderr, the JSON lines to stdout
            step_kinds.bench_steps(args, json_out)
        return
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"cpu ({torch.get_num_threads()} threads)", "torch": torch.__version__}
    # libraries log to stdout (DeepSpeed's accelerator line); keep stdout for the JSON alone
    with contextlib.redirect_stdout(sys.stderr):
        if args.part in ("all", "throughput"):
            report["throughput"] = bench_throughput(args, device)
        if args.part in ("all", "memory"):
            report["item_loss_memory"] = bench_memory(args, device)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
