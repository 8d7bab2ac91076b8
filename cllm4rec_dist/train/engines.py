"""One optimizer engine per trainable parameter group: 'collab', 'content' (and 'backbone': FtAll/Scratch, or LoRA).

The paper trains the collaborative and the content side with separate Adam
optimizers; a C-step must never touch collaborative Adam state and vice versa.
Each group therefore gets its own engine. The rec-step uses the 'collab' group
with a FRESH optimizer state and the finetuning lr (``reset_optimizer``): L-steps
and rec-steps never share a phase, so one engine per group serves both.

``TorchEngine`` is the single-process reference; ``DeepSpeedEngine`` wraps a
DeepSpeed ZeRO engine over the same parameters and has the same interface.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import torch
from torch import nn

from cllm4rec_dist.resources import packaged
from cllm4rec_dist.settings import ConfigError
from cllm4rec_dist.train.checkpoint import CheckpointWriter, check_optimizer_state, load_state

LR_SCALE = "lr_scale"
"""The key of a torch param group holding its learning-rate multiplier: the group steps at base lr x scale."""

Params = list  # of nn.Parameter, or of param-group dicts {"params": [...], LR_SCALE: float} (``scaled_groups``)


def scaled_groups(params: list[nn.Parameter], scale_of: dict[int, float]) -> Params:
    """``params`` as param groups by learning-rate multiplier (``scale_of``: id(parameter) -> multiplier, absent
    = 1), the 1x group first; the plain list when every multiplier is 1, so the optimizer state keeps the one
    group that checkpoints without multipliers hold."""
    scales = [float(scale_of.get(id(p), 1.0)) for p in params]
    if all(s == 1.0 for s in scales):
        return list(params)
    order = sorted(set(scales), key=lambda s: (s != 1.0, s))
    return [{"params": [p for p, s in zip(params, scales) if s == scale], LR_SCALE: scale} for scale in order]


def flat_params(params: Params) -> list[nn.Parameter]:
    return [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]


def make_adam(params: Params, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """torch Adam, FUSED (one kernel per parameter) where torch has it: on this CPU a step over the 2.7M
    collaborative parameters of the benchmark shapes takes 3 ms fused against 30 ms with the default
    for-each implementation, the rec-step's largest cost after the backbone. Same update either way.
    Param groups from ``scaled_groups`` step at ``lr`` x their multiplier (``set_group_lr``)."""
    flat = flat_params(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in flat)
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    set_group_lr(optimizer.param_groups, lr)
    return optimizer


def set_group_lr(param_groups: list[dict], lr: float) -> None:
    """Every group at ``lr`` times its own multiplier (1 for a group without one)."""
    for group in param_groups:
        group["lr"] = lr * group.get(LR_SCALE, 1.0)


def base_lr(param_groups: list[dict]) -> float:
    """The base learning rate ``set_group_lr`` was given (not a scaled group's own)."""
    group = param_groups[0]
    return group["lr"] / group.get(LR_SCALE, 1.0)


class TorchEngine:
    """Plain torch Adam over one parameter group. In a multi-rank run it serves parameters that every rank
    trains identically (same data, same seed, no communication, e.g. A-LLMRec's stage 1): rank 0 alone
    writes the optimizer state and every rank reads that one file back."""

    def __init__(self, name: str, params: Params, lr: float, weight_decay: float = 0.0, grad_clip: float = 0.0):
        self.name = name
        self.params = flat_params(params)
        self.grad_clip = grad_clip
        self.optimizer = make_adam(params, lr, weight_decay)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        """Clip (if set), step, zero the grads; returns the gradient norm (a tensor: no host-device sync)."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def reset_optimizer(self, lr: float) -> None:
        self.optimizer.state = defaultdict(dict)
        self.set_lr(lr)

    def set_lr(self, lr: float) -> None:
        set_group_lr(self.optimizer.param_groups, lr)

    @property
    def lr(self) -> float:
        return base_lr(self.optimizer.param_groups)

    def state_file(self, rank: int) -> str:
        return f"optim-{self.name}.pt"  # one process holds the whole state

    def save(self, writer: CheckpointWriter) -> None:
        if writer.rank == 0:
            writer.save(self.state_file(writer.rank), self.optimizer.state_dict())

    def sharded_targets(self) -> dict[str, tuple[torch.Tensor, object]]:
        """Row-sharded optimizer tensors to read back from a checkpoint: none (only ShardedEngine has them)."""
        return {}

    def restore_sharded(self, loaded: dict[str, torch.Tensor]) -> None:
        """Take this engine's row-sharded tensors from what the checkpoint read: none here."""

    def load(self, directory: str, rank: int = 0) -> None:
        path = os.path.join(directory, self.state_file(rank))
        state = load_state(path)
        check_optimizer_state(path, state, [g["params"] for g in self.optimizer.param_groups])
        self.optimizer.load_state_dict(state)


class DataParallelEngine(TorchEngine):
    """Torch Adam over a group whose backward ANOTHER engine runs: a group stepped in every step kind beside that
    kind's own engine (the backbone's LoRA adapters, or the whole backbone for LLM-FtAll / LLM-Scratch, shared by the
    collaborative and the content LLM). A DeepSpeed engine cannot serve it: ZeRO reduces the gradients in its own
    ``backward``, which the step never calls for this group (its ``step`` then fails). Here each rank's gradients
    are averaged over the ranks with all-reduces of flat buckets (at most ``BUCKET`` elements each, so a whole
    backbone needs one bucket of extra memory, not a second copy of its gradients), then every rank takes the same
    Adam step (the update of DeepSpeed's averaged gradients); the optimizer state is the same on every rank, so rank
    0 alone writes it (``TorchEngine``). A parameter no rank has a gradient for keeps none (Adam skips it, as in
    one process)."""

    BUCKET = 1 << 24  # elements (64 MiB of fp32)

    def step(self) -> torch.Tensor:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._average_gradients(dist)
        return super().step()

    def _average_gradients(self, dist) -> None:
        world = dist.get_world_size()
        has_grad = torch.tensor([float(p.grad is not None) for p in self.params], device=self.params[0].device)
        dist.all_reduce(has_grad)
        bucket: list[nn.Parameter] = []
        size = 0
        for param, count in zip(self.params, has_grad.tolist()):
            if count == 0:
                param.grad = None  # no rank has one
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param)  # this rank's share is zero; the others' still count
            if bucket and size + param.numel() > self.BUCKET:
                self._reduce_bucket(dist, bucket, world)
                bucket, size = [], 0
            bucket.append(param)
            size += param.numel()
        if bucket:
            self._reduce_bucket(dist, bucket, world)

    @staticmethod
    def _reduce_bucket(dist, bucket: list[nn.Parameter], world: int) -> None:
        flat = torch.cat([p.grad.reshape(-1).float() for p in bucket])
        dist.all_reduce(flat)
        for param, piece in zip(bucket, flat.div_(world).split([p.numel() for p in bucket])):
            param.grad = piece.view_as(param).to(param.dtype)


class _ParamGroup(nn.Module):
    """A module view of a parameter group (same Parameter objects), for DeepSpeed to manage."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        self.group = nn.ParameterList(params)


def load_ds_config(path: str, micro_batch: int, world_size: int, grad_clip: float) -> dict:
    """Read a DeepSpeed JSON and fill in what comes from our config (batch sizes, clipping)."""
    if not os.path.isfile(path):
        raise ConfigError(f"dist.ds_config={path!r}: no such file. Use one of the project's "
                          f"{', '.join(sorted(os.listdir(packaged('ds_configs'))))} (in {packaged('ds_configs')}) "
                          "or a path to your own DeepSpeed JSON.")
    with open(path, encoding="utf-8") as f:
        try:
            ds = json.load(f)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg}); fix the DeepSpeed "
                              "config.") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: a DeepSpeed config is a JSON object, got {type(ds).__name__}.")
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage={stage!r}; it must be 0-3 (use 1 or 2).")
    for key in ("fp16", "bf16"):
        if (ds.get(key) or {}).get("enabled"):
            raise ConfigError(f"{path}: {key}.enabled casts the whole module; the trainable tables stay fp32 and "
                              f"the backbone precision is model.precision. Remove the '{key}' section.")
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = micro_batch * world_size
    ds["gradient_clipping"] = grad_clip
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def init_distributed() -> None:
    """``deepspeed.init_distributed`` (NCCL with GPUs, else gloo) WITHOUT DeepSpeed's shared-memory all-reduce op.

    That op serves DeepSpeed inference only (``inference_all_reduce``; training's all-reduces go through
    torch.distributed), but DeepSpeed builds it in every process that initialises its communication: it
    probes every op builder with compiler subprocesses and JIT-compiles the op's C++ (20-95 s per run here:
    the build cache is rebuilt whenever another venv or flag set used it). ``build_shm_op`` returning None is
    DeepSpeed's own "op not available" path (its inference all-reduce then falls back to torch.distributed).
    """
    import importlib

    import deepspeed

    # Not ``import deepspeed.comm.torch as m``: that binds the attribute ``deepspeed.comm.torch``, which
    # ``deepspeed.comm``'s star import has made the torch package itself, so the patch would miss the module.
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    ds_comm_torch.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


class DeepSpeedEngine(TorchEngine):
    """A DeepSpeed ZeRO engine over one parameter group (the optimizer state is partitioned across ranks)."""

    def __init__(self, name: str, params: Params, lr: float, ds_config: dict, weight_decay: float = 0.0):
        import deepspeed

        self.name = name
        self.params = flat_params(params)
        optimizer = make_adam(params, lr, weight_decay)  # torch's: no DeepSpeed op compile
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=_ParamGroup(self.params), optimizer=optimizer, config=ds_config)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> torch.Tensor:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()  # a tensor or a float, whatever the ZeRO stage computed
        return torch.as_tensor(norm if norm is not None else float("nan")).detach()

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    @property
    def _inner(self) -> torch.optim.Optimizer:
        # ZeRO wraps the torch optimizer; its .optimizer holds the Adam state of this rank's partition.
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def reset_optimizer(self, lr: float) -> None:
        self._inner.state = defaultdict(dict)
        self.set_lr(lr)

    def set_lr(self, lr: float) -> None:
        set_group_lr(self._inner.param_groups, lr)
        set_group_lr(self.optimizer.param_groups, lr)

    @property
    def lr(self) -> float:
        return base_lr(self._inner.param_groups)

    # DeepSpeed's own save/load_checkpoint pickle whole objects and read them back with the unsafe (code-running)
    # torch.load, so a crafted file would run code on resume. Each rank instead saves the torch Adam state of its ZeRO
    # partition (tensors and plain data) through train/checkpoint.py; the fp32 master partition is rebuilt
    # from the restored weights (fp32 tables: exact).

    def state_file(self, rank: int) -> str:
        return f"optim-{self.name}-rank{rank}.pt"

    def save(self, writer: CheckpointWriter) -> None:
        writer.save(self.state_file(writer.rank), self._inner.state_dict(), per_rank=True)

    def load(self, directory: str, rank: int = 0) -> None:
        path = os.path.join(directory, self.state_file(rank))
        state = load_state(path)
        check_optimizer_state(path, state, [g["params"] for g in self._inner.param_groups])
        refresh = getattr(self.optimizer, "refresh_fp32_params", None)
        if refresh is not None:  # ZeRO-1/2: the master partition from the weights the trainer just restored
            refresh()
        self._inner.load_state_dict(state)
        relink = getattr(self.optimizer, "_link_all_hp_params", None)
        if relink is not None:  # what DeepSpeed's own loader does after replacing the optimizer state
            relink()


class ShardedEngine:
    """Adam over ROW SHARDS (model/sharding.py): each rank steps its own rows and holds the Adam state of those
    rows only; the group's replicated parameters, if any, stay with ``inner`` (a DeepSpeed or torch engine).

    A shard's gradient is the SUM over every rank's loss (the owner receives every rank's use of its rows), so
    it is divided by the world size before the step: the same update as data parallel's averaged gradient.
    Gradient clipping uses the global norm of the shards (one all-reduce); ``inner`` clips its own parameters.
    The optimizer state goes into the checkpoint's sharded part (train/checkpoint.py), which any number of ranks
    can read back."""

    def __init__(self, name: str, shards: dict[str, tuple[nn.Parameter, object]], lr: float,
                 weight_decay: float = 0.0, grad_clip: float = 0.0, inner: TorchEngine | None = None,
                 lr_scale_of: dict[int, float] | None = None):
        self.name, self.shards, self.grad_clip, self.inner = name, shards, grad_clip, inner
        self.shard_params = [param for param, _ in shards.values()]
        self.params = self.shard_params + (inner.params if inner is not None else [])
        self.optimizer = make_adam(scaled_groups(self.shard_params, lr_scale_of or {}), lr, weight_decay)
        self.world_size = max((layout.world_size for _, layout in shards.values()), default=1)

    def backward(self, loss: torch.Tensor) -> None:
        if self.inner is not None:
            self.inner.backward(loss)  # DeepSpeed's backward reduces the replicated gradients; autograd fills ours
        else:
            loss.backward()

    def step(self) -> torch.Tensor:
        grads = [p.grad for p in self.shard_params if p.grad is not None]
        if self.world_size > 1:
            torch._foreach_div_(grads, float(self.world_size))
        squares = torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros(())
        if self.world_size > 1:
            import torch.distributed as dist

            from cllm4rec_dist.model.sharding import sharding_group
            dist.all_reduce(squares, group=sharding_group())
        norm = squares.sqrt()
        if self.grad_clip > 0:
            torch._foreach_mul_(grads, float(torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.inner is not None:
            norm = (norm.pow(2) + self.inner.step().float().pow(2)).sqrt()
        return norm.detach()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.inner is not None:
            self.inner.zero_grad()

    def reset_optimizer(self, lr: float) -> None:
        self.optimizer.state = defaultdict(dict)
        self.set_lr(lr)
        if self.inner is not None:
            self.inner.reset_optimizer(lr)

    def set_lr(self, lr: float) -> None:
        set_group_lr(self.optimizer.param_groups, lr)
        if self.inner is not None:
            self.inner.set_lr(lr)

    @property
    def lr(self) -> float:
        return base_lr(self.optimizer.param_groups)

    def resident_bytes(self) -> int:
        """Bytes of the shards and of their Adam state held by this rank."""
        tensors = list(self.shard_params) + [v for state in self.optimizer.state.values() for v in state.values()
                                             if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---- checkpoints: the Adam state of the shards as row-sharded tensors (key -> (local tensor, layout))

    _ROW_STATE = ("exp_avg", "exp_avg_sq")

    def _key(self, param_name: str, field: str) -> str:
        return f"optim.{self.name}.{param_name}.{field}"

    def save(self, writer: CheckpointWriter) -> None:
        for param_name, (param, layout) in self.shards.items():
            state = self.optimizer.state.get(param)
            if not state:
                continue  # no step yet (or just reset): nothing to save
            writer.add_sharded(self._key(param_name, "step"), state["step"].reshape(1), None)
            for field in self._ROW_STATE:
                writer.add_sharded(self._key(param_name, field), state[field], layout)
        if self.inner is not None:
            self.inner.save(writer)

    def sharded_targets(self) -> dict[str, tuple[torch.Tensor, object]]:
        """Buffers a sharded checkpoint's Adam state is read into (``restore_sharded`` then installs them)."""
        targets = {}
        for param_name, (param, layout) in self.shards.items():
            targets[self._key(param_name, "step")] = (torch.zeros(1, dtype=torch.float32), None)
            for field in self._ROW_STATE:
                targets[self._key(param_name, field)] = (torch.zeros_like(param), layout)
        return targets

    def restore_sharded(self, loaded: dict[str, torch.Tensor]) -> None:
        """Install the Adam state read from a sharded checkpoint (parameters without any keep a fresh state)."""
        self.optimizer.state = defaultdict(dict)
        for param_name, (param, _) in self.shards.items():
            if self._key(param_name, "step") in loaded:
                self.optimizer.state[param] = {"step": loaded[self._key(param_name, "step")].reshape(()),
                                               **{f: loaded[self._key(param_name, f)] for f in self._ROW_STATE}}

    def load(self, directory: str, rank: int = 0) -> None:
        if self.inner is not None:
            self.inner.load(directory, rank)
