"""Pretrain + finetune CLLM4Rec with Ray Train workers running DeepSpeed ZeRO engines.

    python launchers/pretrain_llama.py                       # the embedded default: demo data, local Ray, CPU
    ray job submit -- python launchers/pretrain_llama.py --config configs/my_cluster.yaml

With no running cluster a local Ray is started in-process, sized to this machine's CPUs (more workers than
fit are refused: join a cluster with --dist.ray_address). Every setting is a key of the --config YAML or a
`--section.field VALUE` flag (see --help). Ctrl-C or SIGTERM stops the run with one line naming its folder and
the command that resumes it (exit status 130 / 143).
"""

import time

FIRST_STATEMENT = time.time(), time.process_time()  # before the imports: train/timing.py launch_started_at

import sys  # noqa: E402

from cllm4rec_dist.distributed import launch_ray  # noqa: E402
from cllm4rec_dist.errors import run_command  # noqa: E402
from cllm4rec_dist.launch import exit_now, finish, interruptible, parse  # noqa: E402
from cllm4rec_dist.train.timing import PhaseTimer, launch_started_at  # noqa: E402


def main(argv=None) -> int:
    timer = PhaseTimer()
    timer.mark("process_started", launch_started_at(*FIRST_STATEMENT))
    timer.mark("started")
    cfg, args = parse(__doc__, argv)
    return finish(cfg, args, launch_ray(cfg, timer, exports=not args.no_export), timer)


if __name__ == "__main__":
    exit_now(interruptible(run_command, main, command=["python", *sys.argv]))
