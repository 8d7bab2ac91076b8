"""Progress lines, `train_log.jsonl` and TensorBoard scalars, written by rank 0 from reduced values.

TensorBoard tags: `<kind>/loss`, `<kind>/lm`, `<kind>/mr`, `<kind>/grad_norm`, `<kind>/lr`,
`<kind>/tokens_per_s` for kind in C, L, rec; `valid/recall@20` ...; `test/...`;
`memory/rss_mb` (and `memory/cuda_max_mb` on GPUs). Open with
`tensorboard --logdir <run>/tensorboard`.
"""

from __future__ import annotations

import json
import os
import resource
import time

import torch


class Monitor:
    def __init__(self, run_dir: str, is_main: bool, log_every: int = 10, world_size: int = 1,
                 resume_step: int = 0):
        self.is_main = is_main
        self.log_every = max(1, log_every)
        self.world_size = world_size
        self.writer = None
        self.log_path = os.path.join(run_dir, "train_log.jsonl")
        self.started = time.time()
        self.tokens_since = 0.0
        self.seconds_since = 0.0
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=resume_step or None)
            self._truncate_log(resume_step)

    def _truncate_log(self, resume_step: int) -> None:
        """On resume, drop log lines past the checkpoint: the resumed run writes them again."""
        if not os.path.exists(self.log_path):
            return
        with open(self.log_path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip() and json.loads(line).get("global_step", 0) <= resume_step]
        with open(self.log_path, "w", encoding="utf-8") as f:
            f.writelines(lines)

    def step(self, state, block, kind: str, values: list[float], seconds: float, total_steps: int, lr: float) -> None:
        if not self.is_main:
            return
        loss, lm, mr, tokens, grad_norm = values
        tokens *= self.world_size  # tokens were averaged over ranks; report the global count
        self.tokens_since += tokens
        self.seconds_since += seconds
        gs = state.global_step
        record = {"global_step": gs, "phase": block.phase, "epoch": block.epoch, "kind": kind, "loss": loss,
                  "lm": lm, "mr": mr, "tokens": tokens, "grad_norm": grad_norm, "lr": lr, "seconds": seconds}
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        w = self.writer
        for key in ("loss", "lm", "mr", "grad_norm", "lr"):
            w.add_scalar(f"{kind}/{key}", record[key], gs)
        w.add_scalar(f"{kind}/tokens_per_s", tokens / max(seconds, 1e-9), gs)
        if gs % self.log_every == 0 or gs == total_steps:
            rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            w.add_scalar("memory/rss_mb", rss_mb, gs)
            if torch.cuda.is_available():
                w.add_scalar("memory/cuda_max_mb", torch.cuda.max_memory_allocated() / 2**20, gs)
            rate = self.tokens_since / max(self.seconds_since, 1e-9)
            print(f"[train] {block.phase} ep {block.epoch} step {gs}/{total_steps} {kind:>3s} "
                  f"loss {loss:.4f} (lm {lm:.4f} mr {mr:.4f}) {rate:,.0f} tok/s "
                  f"elapsed {time.time() - self.started:.0f}s", flush=True)
            self.tokens_since = self.seconds_since = 0.0

    def evaluation(self, part: str, metrics: dict, global_step: int) -> None:
        if not self.is_main:
            return
        for key, value in metrics.items():
            if value is not None and not key.startswith("num_"):
                self.writer.add_scalar(f"{part}/{key}", value, global_step)
        self.writer.flush()
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None and not k.startswith("num_"))
        print(f"[eval] {part} @ step {global_step}: {shown} ({metrics.get('num_users')} users)", flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
