"""Ray Train on a local cluster that this process started and stops: the cluster machinery it does without.

Ray Train 2.x's controller, before it starts any training worker, creates and waits on actors that serve a cluster
it does not own: an autoscaling coordinator that it sends its resource request to (a ``ray.get`` of up to 5 s on a
new Python process importing Ray Data), a placement-group cleaner that removes the workers' placement group if the
controller dies, and a Ray Data dataset manager, created even when the trainer is given no dataset. On the
in-process cluster of `launch_ray` there is no autoscaler to ask, the placement group ends with the cluster
(``ray.shutdown``), and our workers read their webdataset shards themselves: each of these actors is one more
process importing Ray on the cores the workers start on, the first of them on the path to the workers.

`local_trainer_class` returns a `TorchTrainer` subclass that leaves those three out, or the plain `TorchTrainer`
where this Ray's private layout differs (every name used here is checked, nothing is assumed). A run that joins a
cluster (``--dist.ray_address``, ``ray job submit``) always gets the plain one.

The scaling policy is pickled into the controller actor, so the class lives in this small module that the
controller process can import cheaply.
"""

from __future__ import annotations

import logging

from ray.train.torch import TorchTrainer

logger = logging.getLogger(__name__)

try:  # Ray Train V2's private layout (ray 2.5x-2.6x); without it the plain TorchTrainer runs
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
except ImportError:  # pragma: no cover - another Ray version
    DatasetsCallback = PlacementGroupCleanerCallback = FixedScalingPolicy = None


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

    class LocalTorchTrainer(TorchTrainer):
        """`TorchTrainer` for a run on a local cluster with no Ray dataset (see the module doc)."""

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
    hooks = [(TorchTrainer, "_create_default_callbacks"), (TorchTrainer, "_initialize_and_run_controller"),
             (FixedScalingPolicy, "_maybe_send_resource_request"), (FixedScalingPolicy, "_send_resource_request"),
             (FixedScalingPolicy, "_cancel_resource_request"), (FixedScalingPolicy, "after_controller_start")]
    return all(callable(getattr(cls, name, None)) for cls, name in hooks)


def local_trainer_class(local_cluster: bool, has_datasets: bool = False):
    """The trainer class for a run: `LocalTorchTrainer` on a local cluster this process started with no Ray
    dataset, where this Ray's private layout is the one it knows; the plain `TorchTrainer` otherwise."""
    if not local_cluster or has_datasets:
        return TorchTrainer
    if not _layout_known():
        logger.info("ray_local: this Ray's Train internals differ; using the plain TorchTrainer")
        return TorchTrainer
    return LocalTorchTrainer
