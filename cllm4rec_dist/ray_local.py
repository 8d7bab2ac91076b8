"""Ray Train on a local cluster that this process started and stops: the cluster machinery it does without.

Ray Train 2.x's controller, before it starts any training worker, creates and waits on actors that serve a cluster
it does not own: an autoscaling coordinator that it sends its resource request to (a ``ray.get`` of up to 5 s on a
new Python process importing Ray Data), a placement-group cleaner that removes the workers' placement group if the
controller dies, and a Ray Data dataset manager, created even when the trainer is given no dataset. On the
in-process cluster of `launch_ray` there is no autoscaler to ask, the placement group ends with the cluster
(``ray.shutdown``), and our workers read their webdataset shards themselves: each of these actors is one more
process importing Ray on the cores the workers start on, the first of them on the path to the workers.

The controller also imports torch, before it creates the workers, only to unpickle ``TorchConfig``, whose module
imports torch at the top although the controller calls no torch function. On CPU
workers `GlooProcessGroup` stands in for it: the same process group (gloo, ``env://``, the torchrun variables
set on each worker), set up by functions that import torch on the workers.

`local_trainer_class` returns `LocalTrainer`, which leaves those three actors out and uses `GlooProcessGroup` on
CPU workers, or the plain `TorchTrainer` where this Ray's private layout differs (every name used here is checked,
nothing is assumed). A run that joins a cluster (``--dist.ray_address``, ``ray job submit``) always gets the plain
one.

The controller unpickles the scaling policy and the backend config, so they live in this module, which imports
neither torch nor ``ray.train.torch`` (a test checks it in a fresh interpreter).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import ray
from ray.train.backend import Backend, BackendConfig

logger = logging.getLogger(__name__)

PROCESS_GROUP_SHUTDOWN_TIMEOUT_S = 30
"""How long the workers get to leave the process group at the end (Ray's TorchConfig: 30 s as well)."""

try:  # Ray Train V2's private layout (ray 2.5x-2.6x); without it the plain TorchTrainer runs
    from ray.train._internal.utils import get_address_and_port
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
    from ray.train.v2._internal.util import TrainingFramework
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
except ImportError:  # pragma: no cover - another Ray version
    DatasetsCallback = PlacementGroupCleanerCallback = FixedScalingPolicy = TrainingFramework = None


def _join_process_group(master_addr: str, master_port: int, timeout_s: int) -> None:
    """On a training worker: the torchrun variables (what DeepSpeed and torch read), then the gloo process group."""
    from datetime import timedelta

    import torch.distributed as dist

    context = ray.train.get_context()
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
                      RANK=str(context.get_world_rank()), WORLD_SIZE=str(context.get_world_size()),
                      LOCAL_RANK=str(context.get_local_rank()), LOCAL_WORLD_SIZE=str(context.get_local_world_size()),
                      NODE_RANK=str(context.get_node_rank()))
    dist.init_process_group(backend="gloo", init_method="env://", rank=context.get_world_rank(),
                            world_size=context.get_world_size(), timeout=timedelta(seconds=timeout_s))


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class _GlooBackend(Backend):
    def on_start(self, worker_group, backend_config: GlooProcessGroup) -> None:
        master_addr, master_port = worker_group.execute_single(0, get_address_and_port)
        # Every rank joins at once: init_process_group waits for the whole world.
        ray.get([worker_group.execute_single_async(rank, _join_process_group, master_addr, master_port,
                                                   backend_config.timeout_s) for rank in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config: GlooProcessGroup) -> None:
        try:
            ray.get(worker_group.execute_async(_leave_process_group), timeout=PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            logger.warning("ray_local: the workers did not leave the process group in %d s",
                           PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)


@dataclasses.dataclass
class GlooProcessGroup(BackendConfig):
    """torch.distributed over gloo on CPU workers, as Ray's ``TorchConfig()`` sets it up there, from a module the
    controller imports without torch (see the module doc)."""

    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return _GlooBackend

    @property
    def framework(self):
        return TrainingFramework.TORCH  # defined wherever this class is used (`_layout_known`)

    def to_dict(self) -> dict:
        return {"backend": "gloo", "init_method": "env", "timeout_s": self.timeout_s}


if FixedScalingPolicy is not None:
    SKIPPED_CALLBACKS = (DatasetsCallback, PlacementGroupCleanerCallback)

    class LocalScalingPolicy(FixedScalingPolicy):
        """The fixed worker count, with no resource request sent: nothing autoscales a local cluster."""

        def _maybe_send_resource_request(self) -> None:
            pass

        def _send_resource_request(self) -> None:
            pass

        def _cancel_resource_request(self) -> None:
            pass

        def after_controller_start(self, train_run_context) -> None:
            pass

    class LocalTrainer(DataParallelTrainer):
        """Ray Train's data-parallel trainer for a run on a local cluster with no Ray dataset (see the module doc):
        `GlooProcessGroup` on CPU workers, Ray's ``TorchConfig`` (imported here, on the driver) on GPU workers."""

        def __init__(self, train_loop_per_worker, *, scaling_config, **kwargs):
            if scaling_config.use_gpu:
                from ray.train.torch import TorchConfig

                backend_config = TorchConfig(backend="nccl")
            else:
                backend_config = GlooProcessGroup()
            super().__init__(train_loop_per_worker, backend_config=backend_config, scaling_config=scaling_config,
                             **kwargs)

        def _create_default_callbacks(self):
            return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, SKIPPED_CALLBACKS)]

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            if isinstance(controller_init_kwargs.get("scaling_policy"), FixedScalingPolicy):
                controller_init_kwargs["scaling_policy"] = LocalScalingPolicy(self.scaling_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)


def _layout_known() -> bool:
    """Whether this Ray has the private classes and every hook the subclasses override (by name)."""
    if FixedScalingPolicy is None:
        return False
    hooks = [(DataParallelTrainer, "_create_default_callbacks"),
             (DataParallelTrainer, "_initialize_and_run_controller"), (Backend, "on_start"), (Backend, "on_shutdown"),
             (FixedScalingPolicy, "_maybe_send_resource_request"), (FixedScalingPolicy, "_send_resource_request"),
             (FixedScalingPolicy, "_cancel_resource_request"), (FixedScalingPolicy, "after_controller_start")]
    return all(callable(getattr(cls, name, None)) for cls, name in hooks)


def local_trainer_class(local_cluster: bool, has_datasets: bool = False):
    """The trainer class for a run: `LocalTrainer` on a local cluster this process started with no Ray dataset,
    where this Ray's private layout is the one it knows; the plain `TorchTrainer` otherwise."""
    from ray.train.torch import TorchTrainer  # the driver's import of torch; the controller never runs this

    if not local_cluster or has_datasets:
        return TorchTrainer
    if not _layout_known():
        logger.info("ray_local: this Ray's Train internals differ; using the plain TorchTrainer")
        return TorchTrainer
    return LocalTrainer
