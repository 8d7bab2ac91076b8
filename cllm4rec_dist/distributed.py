"""Distributed training: Ray Train starts N workers; each runs the recipe with DeepSpeed ZeRO engines.

Two ways in, one worker function:
* `launch_ray(cfg)`: a Ray Train `TorchTrainer` (local Ray started in-process when there is
  no cluster; `ray job submit` runs it on a cluster). Checkpoints go to Ray's storage path
  and a restarted worker resumes from the latest one (``FailureConfig``).
* `run_torch_distributed(cfg)`: a process of the `deepspeed` / `torchrun` launchers
  (RANK / WORLD_SIZE / MASTER_ADDR in the environment); checkpoints in <run>/checkpoints.

A local Ray cluster is the size of the machine (`machine_cpus`: the CPUs this process may use, a container's
CPU quota included); a job that needs more CPUs (or GPUs) than it has is refused before Ray starts
(`local_ray_cpus`), since Ray would wait forever for the workers that do not fit. Ray's logs are copied into
the run folder private to the user (`copy_private`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading

from cllm4rec_dist import ray_warm
from cllm4rec_dist.config import ConfigError, TrainConfig, config_from_dict, read_yaml_settings
from cllm4rec_dist.errors import UserError, report_now
from cllm4rec_dist.recommenders import recommender
from cllm4rec_dist.train.monitor import CONSOLE_FILE
from cllm4rec_dist.train.run_folder import (
    RunFolderError,
    RunLock,
    check_resume_config,
    check_resume_dataset,
    default_run_dir,
)
from cllm4rec_dist.train.timing import PhaseTimer

# torch, DeepSpeed, the recipes and the dataset reader are imported where they are used: a Ray driver needs none
# of them before its local Ray is starting (it starts in the background while the driver imports them for its
# checks, `RayStart`), and the workers import them when they run.

# Test hook: "RANK:STEP" makes that rank's process die (SIGKILL-like) once at that global step.
KILL_ENV = "CLLM4REC_KILL_RANK_AT_STEP"


def check_combination(cfg: TrainConfig, ds_config: dict) -> None:
    """Refuse DeepSpeed setups known not to work with this model, saying what to use instead."""
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        raise ConfigError(
            f"{cfg.dist.ds_config}: ZeRO stage 3 is not supported. It partitions the tables' WEIGHTS, which every "
            "step reads in full (any user or item can be in a batch; the item softmax spans the catalogue), and it "
            "cannot hold a bitsandbytes int8/4-bit backbone either. Use ds_configs/zero2.json (gradients and Adam "
            "state partitioned, the frozen backbone replicated) or ds_configs/zero1.json.")


def build_worker_recipe(cfg: TrainConfig, sink, timer: PhaseTimer | None = None):
    """Recipe for this process's rank, with DeepSpeed engines from cfg.dist.ds_config."""
    import torch.distributed as dist

    from cllm4rec_dist.train.engines import DeepSpeedEngine, load_ds_config
    from cllm4rec_dist.train.rank import Rank

    rank, world = dist.get_rank(), dist.get_world_size()
    ds_config = load_ds_config(cfg.dist.ds_config, cfg.batch.batch_size, world, cfg.optim.grad_clip)
    check_combination(cfg, ds_config)

    def engine_factory(name, params, lr):
        return DeepSpeedEngine(name, params, lr, ds_config, cfg.optim.weight_decay)

    return recommender(cfg.recommender).recipe_class()(cfg, Rank(rank, world), engine_factory, sink, timer)


def _install_kill_hook(recipe) -> None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    kill_rank, kill_step = (int(x) for x in spec.split(":"))
    marker = os.path.join(recipe.cfg.out, f".killed-rank{kill_rank}-step{kill_step}")
    if recipe.rank.rank != kill_rank or os.path.exists(marker):
        return
    trainer = recipe.trainer
    original = trainer.train_step

    def train_step(kind, **kwargs):
        if trainer.state.global_step + 1 == kill_step:
            open(marker, "w").close()
            line = f"[train] rank {kill_rank}: killed at step {kill_step} (test hook)"
            print(line, flush=True)
            with open(os.path.join(recipe.cfg.out, CONSOLE_FILE), "a", encoding="utf-8") as f:
                f.write(line + "\n")  # what the Ray driver relays to its console
            os._exit(1)
        return original(kind, **kwargs)

    trainer.train_step = train_step


def ray_worker_loop(config: dict) -> dict:
    """Runs in every Ray Train worker (torch.distributed is already initialised by Ray). Returns the final metrics,
    which Ray Train hands to the driver as ``Result.return_value`` (rank 0's). Not a last ``ray.train.report``: Ray
    Train 2.x keeps only the metrics reported with a checkpoint in its ``Result``, and every report is one more
    round of the controller's polls (0.5 s apart) before it sees the workers finish."""
    timer = PhaseTimer()
    timer.mark("worker_started")
    if ray_warm.started_at is not None:  # the imports began when Ray started this process (ray_warm.py)
        timer.mark("warm_imports_started", ray_warm.started_at)
    with timer.phase("worker_imports"):
        import deepspeed  # noqa: F401

        from cllm4rec_dist.train.checkpoint import RaySink
        from cllm4rec_dist.train.engines import init_distributed

        cfg = config_from_dict(config, "ray train_loop_config")
        recommender(cfg.recommender).recipe_class()  # the model's code (transformers...), imported here
    with timer.phase("init_distributed"):
        init_distributed()
    recipe = build_worker_recipe(cfg, RaySink(cfg.keep_checkpoints), timer).setup()
    _install_kill_hook(recipe)
    result = recipe.train()
    final = {"final": True, **{f"{part}/{k}": v for part in ("valid", "test") for k, v in result.get(part, {}).items()},
             "global_step": result.get("global_step", 0)}
    return final


def launch_ray(cfg: TrainConfig, timer: PhaseTimer | None = None, exports: bool = False) -> dict:
    """Train with Ray Train; joins a running cluster if there is one, else starts a local one. ``exports``: the
    caller exports the run afterwards, so the export's code is imported while the workers start (ray_warm.py).

    A local cluster starts in the background (`RayStart`) while the driver builds the demo dataset when the config
    names it (corpus/preprocess.py ``demo_dataset``) and checks the data and settings; a check that fails stops it
    before any training worker starts. The console gets the rank-0 progress lines (relayed from <run>/console.log)
    and nothing of the libraries' own logging; Ray's logs of a local cluster are copied to <run>/logs/ray at the
    end."""
    timer = timer or PhaseTimer()
    local_cpus = None if _joins_cluster(cfg) else local_ray_cpus(cfg.dist.num_workers, cfg.dist.cpus_per_worker,
                                                                  cfg.dist.use_gpu)
    cfg.out = os.path.abspath(cfg.out or default_run_dir())
    cfg.dist.ds_config = os.path.abspath(cfg.dist.ds_config)
    starting = RayStart(cfg, local_cpus, _local_ray_env()) if local_cpus else None
    try:
        with contextlib.ExitStack() as held:
            with _reported_at_once(starting):
                with timer.phase("driver_imports"):
                    from cllm4rec_dist.corpus.preprocess import demo_dataset
                    from cllm4rec_dist.corpus.shards import ShardedDataset
                    from cllm4rec_dist.train.engines import load_ds_config
                with timer.phase("demo_data"):
                    cfg.data = demo_dataset(cfg.data)
                cfg.data = cfg.data if "://" in cfg.data else os.path.abspath(cfg.data)
                with timer.phase("checks"):
                    # Fail fast on the driver: Ray would otherwise retry a bad path max_failures times on every worker.
                    data = ShardedDataset(cfg.data)
                    recommender(cfg.recommender).check_data(cfg, data)  # e.g. A-LLMRec needs a leave-one-out dataset
                    check_combination(cfg, load_ds_config(cfg.dist.ds_config, cfg.batch.batch_size,
                                                          cfg.dist.num_workers, cfg.optim.grad_clip))
                    data.verify()
                    storage, name = ray_storage(cfg)
                held.enter_context(RunLock(cfg.out))
                with timer.phase("checks"):
                    _check_ray_resume(cfg, storage, name, data.manifest.get("content_hash"))
            return _fit_ray(cfg, storage, name, timer, local_cpus, starting, exports)
    finally:
        if starting is not None:
            starting.stop()  # after the run (_fit_ray shut Ray down), a failed check or an interruption


@contextlib.contextmanager
def _reported_at_once(starting: RayStart | None):
    """A check that fails while a local Ray starts in the background: its line goes to the console now, since
    stopping that Ray on the way out waits for its start to finish (seconds on 2 cores)."""
    try:
        yield
    except Exception as err:
        reported = report_now(err) if starting is not None else None
        if reported is None:
            raise
        raise reported from err


RAY_FOLDER = "ray"
"""Where a Ray run keeps its checkpoints: <run>/ray/checkpoint_<time> (Ray Train's storage path is the run folder,
its experiment name this), or <dist.storage_path>/<run folder's name>/checkpoint_<time>."""


def ray_storage(cfg: TrainConfig) -> tuple[str, str]:
    """(storage path, experiment name) of Ray Train for the run in cfg.out. A run folder written before this layout
    (<run>/ray/<run folder's name>/checkpoint_*) keeps its own, so that it resumes from its checkpoints."""
    name = os.path.basename(cfg.out.rstrip("/"))
    if cfg.dist.storage_path:
        return cfg.dist.storage_path, name
    old = os.path.join(cfg.out, RAY_FOLDER, name)
    if os.path.isdir(old) and any(entry.startswith("checkpoint_") for entry in os.listdir(old)):
        return os.path.join(cfg.out, RAY_FOLDER), name
    return cfg.out, RAY_FOLDER


def _joins_cluster(cfg: TrainConfig) -> bool:
    """Whether launch_ray uses a Ray that is already there (initialised here, or an address) or starts one."""
    if cfg.dist.ray_address or os.environ.get("RAY_ADDRESS"):
        return True
    ray = sys.modules.get("ray")  # not imported: not initialised either
    return ray is not None and ray.is_initialized()


def _cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in CPUs (cgroup v2 cpu.max, v1 cfs quota/period), or None."""
    try:
        with open(os.path.join(root, "cpu.max"), encoding="utf-8") as f:
            quota, period = (f.read().split() + ["100000"])[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us"), encoding="utf-8") as f:
            quota = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us"), encoding="utf-8") as f:
            period = int(f.read())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def machine_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The CPUs this process may use: its affinity mask (os.cpu_count() where there is none), capped by its
    cgroup's CPU quota rounded up (a container started with --cpus 1.5 runs 2 workers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit(cgroup_root)
    if limit:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


def local_ray_cpus(num_workers: int, cpus_per_worker: int, use_gpu: bool = False, cpus: int | None = None,
                   gpus: int | None = None) -> int:
    """The CPUs of the local Ray cluster (this machine's: ``cpus``, default `machine_cpus`) for a job of
    ``num_workers`` x ``cpus_per_worker``; a job that needs more CPUs, or more GPUs than ``gpus`` (default: the
    visible CUDA devices) with ``use_gpu``, is refused (ConfigError, exit status 2) before Ray starts. Ray would
    start the workers that fit (each loading the backbone) and wait forever for the others; a cluster sized to
    the request instead runs every worker on too few cores, each as slow as the machine divided by the count."""
    cpus = machine_cpus() if cpus is None else cpus
    need = num_workers * cpus_per_worker
    elsewhere = "join a Ray cluster that has them: --dist.ray_address HOST:PORT (or submit with `ray job submit`)."
    if need > cpus:
        most = cpus // cpus_per_worker
        here = (f"At most {most} run here (--dist.num_workers {most})" if most else
                f"One worker needs more than the machine has: --dist.cpus_per_worker {cpus} or fewer runs here")
        raise ConfigError(
            f"dist.num_workers {num_workers} x dist.cpus_per_worker {cpus_per_worker} = {need} CPUs, but this machine "
            f"has {cpus}: a local Ray cluster would start {most} worker(s) and wait forever for the other "
            f"{num_workers - most}. {here}; for more, {elsewhere}")
    if use_gpu:
        if gpus is None:
            import torch

            gpus = torch.cuda.device_count()
        if num_workers > gpus:
            raise ConfigError(
                f"dist.num_workers {num_workers} with dist.use_gpu true needs {num_workers} GPUs, but this machine "
                f"has {gpus}: a local Ray cluster would start {gpus} worker(s) and wait forever for the other "
                f"{num_workers - gpus}. At most {gpus} run here (--dist.num_workers {gpus}"
                f"{'' if gpus else ', or --dist.use_gpu false'}); for more, {elsewhere}")
    return cpus


def _check_ray_resume(cfg: TrainConfig, storage: str, name: str, content_hash: str | None) -> None:
    """On the driver, before any worker starts: a resume must keep the saved config's trajectory and data."""
    saved = os.path.join(cfg.out, "config.yaml")
    if not cfg.resume or not os.path.exists(saved):
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(storage)
    if fs.glob(f"{root.rstrip('/')}/{name}/checkpoint_*"):
        check_resume_config(read_yaml_settings(saved), cfg, saved)
        check_resume_dataset(cfg.out, cfg.data, content_hash, cfg.allow_config_change)


def _user_error_in(err: BaseException) -> UserError | None:
    """The project's UserError a failed Ray Train run carries from a worker, if any: Ray Train 2 keeps each
    worker's exception in ``worker_failures`` (rank -> exception) and wraps others in ``cause`` / the chain."""
    pending, seen = [err], set()
    while pending:
        err = pending.pop(0)
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, UserError):
            return err
        failures = getattr(err, "worker_failures", None)
        if isinstance(failures, dict):
            pending += [failures[rank] for rank in sorted(failures)]
        pending += [getattr(err, "controller_failure", None), getattr(err, "cause", None), err.__cause__,
                    err.__context__]
    return None


def _fit_ray(cfg: TrainConfig, storage: str, name: str, timer: PhaseTimer, local_cpus: int | None = None,
             starting: RayStart | None = None, exports: bool = False) -> dict:
    with timer.phase("driver_imports"):
        import ray
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

        from cllm4rec_dist.ray_local import local_trainer_class

    with timer.phase("ray_start"):  # what is left of it: it started in the background (RayStart)
        started_here = _background_or_retry(starting) if starting is not None else _start_ray(cfg, local_cpus)
    controllers = []
    try:
        # On a cluster this process started: without the actors that serve a shared, autoscaled cluster
        trainer = local_trainer_class(local_cluster=started_here)(
            ray_worker_loop,
            train_loop_config=dataclasses.asdict(cfg),
            scaling_config=ScalingConfig(num_workers=cfg.dist.num_workers, use_gpu=cfg.dist.use_gpu,
                                         resources_per_worker={"CPU": cfg.dist.cpus_per_worker}),
            run_config=RunConfig(name=name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=cfg.dist.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                                 # ray_warm.start's cue: only the training workers import the model's code early
                                 worker_runtime_env={"env_vars": {ray_warm.WARM_ENV: cfg.recommender}}
                                 if started_here else None),
        )
        # Ray Train's fit() replaces the SIGINT handler with its own, which aborts the run, then exits the driver
        # with status 0 or 1 and no word. The caller's is kept (a KeyboardInterrupt; in the launchers, one line and
        # status 130), and the run's controller is aborted on the way out.
        if hasattr(trainer, "_register_sigint_handler"):
            trainer._register_sigint_handler = controllers.append
        timer.mark("fit_started")
        if exports:
            timer.mark("export_imports_started", ray_warm.start_export_imports(cfg.recommender))
        with ConsoleRelay(os.path.join(cfg.out, CONSOLE_FILE)), timer.phase("fit"):
            result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        user_error = _user_error_in(err)
        if user_error is not None:  # a worker's one-line error (a diverged loss, a full disk): the driver's too
            raise user_error from None
        raise
    except KeyboardInterrupt:
        for controller in controllers:  # stop the workers now (on a joined cluster too), best effort
            try:
                ray.get(controller.abort.remote(), timeout=30)
            except Exception:  # abort ends the controller actor: the call reports it dead
                pass
        raise
    finally:
        timer.mark("fit_finished")
        if started_here:
            copy_ray_logs(os.path.join(cfg.out, "logs", "ray"))
            with timer.phase("ray_stop"):
                stop_local_ray()
    checkpoint = {"ray_checkpoint": result.checkpoint.path if result.checkpoint else None}
    metrics_file = os.path.join(cfg.out, "metrics.json")
    if not os.path.exists(metrics_file):  # stopped at max_steps: no test, so no metrics.json; the checkpoint holds it
        reported = result.metrics or {}
        return {"stopped": "max_steps reached", "global_step": reported.get("global_step")} | checkpoint
    with open(metrics_file, encoding="utf-8") as f:
        return json.load(f) | checkpoint


def _background_or_retry(starting: RayStart) -> bool:
    """The local Ray that `RayStart` started, or, where that failed, one started now in the foreground. Ray gives
    its raylet 30 s to register, a bound a heavily loaded machine can exceed while this driver competes for the
    cores with its imports; the second try has the cores to itself."""
    try:
        return starting.wait()
    except Exception as err:  # any failure of the background start gets the foreground retry
        starting.stop()  # its half-started processes end with its thread
        print(f"[launch] the local Ray did not start in the background ({str(err).splitlines()[0][:200]}); "
              "starting it again", flush=True)
        return _start_ray(starting.cfg, starting.num_cpus)


def _start_ray(cfg: TrainConfig, local_cpus: int | None) -> bool:
    """Join the cluster cfg names, or start a local one (True) where none is initialised yet.

    ray.init makes SIGTERM a sys.exit in the driver, which then aborts with a C++ stack dump: the caller's
    handler (the launchers': launch.py `interruptible`) is put back after it, and a SIGTERM during it goes to
    that handler too."""
    import ray

    if ray.is_initialized():
        return False
    main_thread = threading.current_thread() is threading.main_thread()
    on_sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        quiet = dict(log_to_driver=False, logging_level=logging.WARNING)  # as start_local_ray's console
        address = cfg.dist.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            # `ray job submit` sets RAY_ADDRESS; the job's runtime env (working dir first on PYTHONPATH)
            # reaches the workers.
            print(f"[launch] joining the Ray cluster at {address} (cllm4rec_dist from "
                  f"{os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})", flush=True)
            ray.init(address=address, **quiet)
            return False
        start_local_ray(local_cpus or local_ray_cpus(cfg.dist.num_workers, cfg.dist.cpus_per_worker,
                                                     cfg.dist.use_gpu), _local_ray_env())
        return True
    except SystemExit as exit_:  # Ray's SIGTERM handler ran before ours was back
        if exit_.code == signal.SIGTERM and callable(on_sigterm):
            on_sigterm(signal.SIGTERM, None)
        raise
    finally:
        if on_sigterm is not None:
            signal.signal(signal.SIGTERM, on_sigterm)


def _local_ray_env() -> dict[str, str]:
    """Environment of a local Ray cluster's processes for a training run (the caller's settings win)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("CLLM4REC_")}
    # Ray Train's controller polls the workers every 2 s by default: up to 2 s from rank 0's last
    # step to fit() returning, on every run. Polling 2 workers every 0.5 s costs nothing measurable.
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # One node that this process started and stops: no node can be preempted, so no watcher actor (one more Python
    # process importing Ray Train while the workers start, on a machine with a few cores).
    env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray's worker_process_setup_hook: every process of the cluster runs it, and it starts the imports of the
    # training workers only (ray_warm.py).
    env[ray_warm.HOOK_ENV] = ray_warm.HOOK
    return env


class RayStart:
    """A local Ray cluster starting in a background thread (``start_local_ray``), so that its 2-3 s of start-up
    overlap the driver's own work (imports, the demo dataset, the checks) instead of following it.

    ``wait()`` returns True once it is up (or raises what ray.init raised); ``stop()`` shuts it down if it is
    still up and ends the thread. The thread lives until then: Ray starts its GCS server and raylet with a
    parent-death signal, which Linux sends when the THREAD that started them ends, not the process. ray.init
    installs no Python SIGTERM handler off the main thread, but Ray's C++ core worker installs its own: ``wait()``
    (on the main thread) puts the caller's (the launchers' one-line interruption) back."""

    def __init__(self, cfg: TrainConfig, num_cpus: int, env_vars: dict[str, str]):
        self.cfg, self.num_cpus = cfg, num_cpus
        self.error: BaseException | None = None
        self.ready, self.release = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, args=(num_cpus, env_vars), name="ray-start", daemon=True)
        self.thread.start()

    def _run(self, num_cpus: int, env_vars: dict[str, str]) -> None:
        try:
            start_local_ray(num_cpus, env_vars)
        except BaseException as err:  # re-raised in the main thread by wait()
            self.error = err
        finally:
            self.ready.set()
        self.release.wait()

    def wait(self) -> bool:
        self.ready.wait()
        if self.error is not None:
            raise self.error
        # Ray's core worker installs its C++ failure-signal handler for SIGTERM (a stack dump and an abort) from
        # whichever thread starts it; only the main thread can put the caller's handler back (sigaction again).
        if threading.current_thread() is threading.main_thread():
            on_sigterm = signal.getsignal(signal.SIGTERM)
            if callable(on_sigterm):
                signal.signal(signal.SIGTERM, on_sigterm)
        return True

    def stop(self) -> None:
        self.ready.wait()
        import ray

        if ray.is_initialized():
            stop_local_ray()
        self.release.set()
        self.thread.join()


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def start_local_ray(num_cpus: int, env_vars: dict[str, str]) -> None:
    """A Ray cluster inside this process, for a machine where none runs (`cllm4rec train`, `cllm4rec tune`).

    Its workers run at the niceness of the command that started it. Ray's default would start them at nice 15,
    to keep a core for its own daemons. Then a training or a search yields to every plain process on the machine:
    a second job started beside a `cllm4rec tune` takes the cores, and the trials stop. Run `nice -n 10 cllm4rec
    tune ...` for the whole job in the background. A cluster started with `ray start` keeps its own setting.
    """
    import ray

    # Ray turns token authentication on for a new local cluster and says so on the console each time
    # ("Token authentication is enabled ..."): nothing to act on. (Setting RAY_AUTH_MODE=token instead stops Ray
    # from creating the cluster's token: the workers then cannot connect.)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Started from RayStart's thread, ray.init warns that it set no SIGTERM handler: the caller keeps its own.
    logging.getLogger("ray._private.worker").addFilter(_DropMessage("SIGTERM handler is not set"))
    # The variables reach the cluster's processes through the environment they inherit (the GCS server and the
    # raylet start inside ray.init; the raylet starts every worker), set for the duration of ray.init only, rather
    # than through a runtime_env, which has the raylet ask its runtime-env agent to set up every worker process it
    # starts (Ray Train starts 4 of its own before the training workers).
    env = {"TOKENIZERS_PARALLELISM": "false", **env_vars}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        # log_to_driver=False: workers' and Ray's own actors' output (one PlacementGroupCleaner warning a second
        # without a dashboard, DeepSpeed banners...) stays in Ray's log files, not on the console.
        # No prestarted workers: Ray starts num_cpus idle Python workers with the node, before any job, and Ray
        # Train starts each of its actors (controller, workers...) in a process of its own; the idle ones only
        # compete for the cores with the driver's imports while the cluster starts.
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 _system_config={"worker_niceness": 0, "enable_worker_prestart": False,
                                 "prestart_worker_first_driver": False})
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def stop_local_ray() -> None:
    """``ray.shutdown()`` of a cluster that `start_local_ray` started, less the second it spends on the autoscaler's
    monitor.

    ray.shutdown stops the node's processes one after another, each with SIGTERM and up to 1 s to exit. The monitor
    (the autoscaler's loop: it holds no state, and nothing autoscales a local node) is stopped after the GCS
    server. Its SIGTERM handler reports its own death to the drivers through that GCS server, which is gone, so it
    never exits and is killed at the end of its second, on every run. Killed first here, it is already gone when
    ray.shutdown reaches it. Where this Ray has no such process or method (another version), ray.shutdown alone
    runs."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # no public API names the node's processes
    kill_monitor = getattr(node, "kill_monitor", None)
    if callable(kill_monitor) and getattr(node, "head", False):
        try:
            kill_monitor(check_alive=False)  # SIGKILL: no handler runs
        except Exception:  # noqa: BLE001 - ray.shutdown stops it the slow way
            pass
    ray.shutdown()


class ConsoleRelay:
    """Prints the lines appended to a file while the block runs (rank 0's console.log on the driver)."""

    def __init__(self, path: str, interval: float = 0.5):
        self.path, self.interval = path, interval
        self.stop = threading.Event()
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0  # a resumed run's old lines stay out

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, name="console-relay", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._print_new()

    def _run(self):
        while not self.stop.wait(self.interval):
            self._print_new()

    def _print_new(self):
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            f.seek(self.offset)
            text = f.read()
        complete = text[: text.rfind("\n") + 1]  # a line still being written waits for the next round
        self.offset += len(complete.encode("utf-8"))
        if complete:
            print(complete, end="", flush=True)


def copy_ray_logs(destination: str) -> None:
    """Copy the log folder of the Ray session this process started (workers' stdout/stderr included)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # no public API names the session's log dir
    source = node.get_logs_dir_path() if node is not None else None
    if source and os.path.isdir(source):
        copy_private(source, destination, shutil.ignore_patterns("*.sock", "*.lock", "old"))


def copy_private(source: str, destination: str, ignore=None) -> None:
    """Copy the regular files of a folder tree into ``destination`` private to the user: folders 0o700, files
    0o600, whatever the source's modes (Ray's session folder is world-writable) or the umask. Sockets, pipes and
    files that vanish while being copied (a log rotated meanwhile) are left out; symbolic links are followed."""
    for root, dirs, files in os.walk(source):
        skipped = ignore(root, dirs + files) if ignore else set()
        dirs[:] = [d for d in dirs if d not in skipped]
        target = os.path.normpath(os.path.join(destination, os.path.relpath(root, source)))
        os.makedirs(target, mode=0o700, exist_ok=True)
        os.chmod(target, 0o700)
        for name in files:
            path, copy = os.path.join(root, name), os.path.join(target, name)
            if name in skipped or not os.path.isfile(path):
                continue
            try:
                with open(path, "rb") as src:
                    fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    os.fchmod(fd, 0o600)  # the file may be there already, with other modes
                    with os.fdopen(fd, "wb") as dst:
                        shutil.copyfileobj(src, dst)
            except FileNotFoundError:
                continue


def _paths_from_rank0(cfg: TrainConfig) -> tuple[str, str]:
    """The dataset and run folder every rank uses, as rank 0 decides them. A default run folder is named by the
    clock, which ranks started a second apart read differently; the embedded demo dataset is built once, not by
    every rank at the same time. A failure on rank 0 reaches the other ranks as an error, not a hang."""
    import torch.distributed as dist

    from cllm4rec_dist.corpus.preprocess import demo_dataset

    decided: list = [None, None, None]  # data, out, rank 0's error
    if dist.get_rank() == 0:
        try:
            decided[:2] = demo_dataset(cfg.data), cfg.out or default_run_dir()
        except Exception as err:  # every rank has to leave the broadcast below
            decided[2] = f"{type(err).__name__}: {err}"
            dist.broadcast_object_list(decided, src=0)
            raise
    dist.broadcast_object_list(decided, src=0)
    if decided[2] is not None:
        raise ConfigError(f"rank 0 could not prepare the run: {decided[2]}")
    return decided[0], decided[1]


def run_torch_distributed(cfg: TrainConfig) -> dict:
    """One process of `deepspeed launchers/finetune.py` / torchrun (env:// rendezvous)."""
    import torch
    import torch.distributed as dist

    from cllm4rec_dist.train.checkpoint import LocalSink
    from cllm4rec_dist.train.engines import init_distributed

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ConfigError(f"{var} is not set: start this with `deepspeed --num_gpus N launchers/finetune.py` "
                               "(or torchrun), or use `cllm4rec train` for one process.")
    init_distributed()
    cfg.data, cfg.out = _paths_from_rank0(cfg)
    lock = RunLock(cfg.out)
    refusal = None
    if dist.get_rank() == 0:  # rank 0 holds the run folder for all ranks
        try:
            lock.acquire()
        except RunFolderError as err:
            refusal = err
    flag = torch.tensor([0 if refusal else 1], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if refusal is not None:
        raise refusal
    if not flag.item():
        raise RunFolderError(f"{cfg.out}: in use by another run (rank 0 says why).")
    try:
        recipe = build_worker_recipe(cfg, LocalSink(cfg.out, cfg.keep_checkpoints)).setup()
        _install_kill_hook(recipe)
        result = recipe.train()
        dist.barrier()
        return result
    finally:
        lock.release()



