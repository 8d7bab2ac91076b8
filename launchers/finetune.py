"""Recommendation finetuning (rec steps + interleaved C steps) from a pretraining checkpoint.

    deepspeed --num_gpus 8 launchers/finetune.py --config cfg.yaml --init_from RUN/checkpoints/step-N
    deepspeed --num_nodes 1 --num_gpus 2 launchers/finetune.py ...      # CPU: DeepSpeed's CPU accelerator
    python launchers/finetune.py --ray --config cfg.yaml --init_from ...  # the same under Ray Train
    deepspeed --num_gpus 2 launchers/finetune.py                         # the embedded default: demo data, CPU

Warm-up and pretraining are skipped (their epochs are set to 0); validation runs after
every finetuning epoch and the best model is tested once. Without --init_from the tables start from their
initialisation. Without --out the ranks share one run folder, runs/<time>, named by rank 0.

With --ray, Ctrl-C or SIGTERM stops the run with one line naming its folder and the command that resumes it
(exit status 130 / 143); under the DeepSpeed launcher, the launcher stops its ranks.

With ``recommender: allmrec`` the same launchers run A-LLMRec's stages (the CLLM4Rec schedule does not
apply): stages 0 and 1 replicated on every rank, stage 2 data-parallel with DeepSpeed ZeRO over F_U/F_I.
"""

import os
import sys

from cllm4rec_dist.errors import run_command
from cllm4rec_dist.launch import exit_now, finish, interruptible, parse
from cllm4rec_dist.train.timing import PhaseTimer, job_started_at


def main(argv=None) -> int:
    timer = PhaseTimer()
    timer.mark("process_started", job_started_at())  # under `deepspeed`: when that command started
    timer.mark("started")
    argv = list(sys.argv[1:] if argv is None else argv)
    use_ray = "--ray" in argv
    if use_ray:
        argv.remove("--ray")
    cfg, args = parse(__doc__, argv)
    cfg.schedule.warmup_epochs = 0
    cfg.schedule.pretrain_epochs = 0
    if use_ray:
        from cllm4rec_dist.distributed import launch_ray

        result = launch_ray(cfg, timer, exports=not args.no_export)  # builds the demo dataset if cfg.data names it
    else:
        from cllm4rec_dist.distributed import run_torch_distributed

        result = run_torch_distributed(cfg)  # rank 0 builds the demo dataset if cfg.data names it
        if "stopped" in result or os.environ.get("RANK", "0") != "0":
            return 0  # only rank 0 of a finished run exports and prints
    return finish(cfg, args, result, timer)


if __name__ == "__main__":
    if "--ray" in sys.argv[1:]:  # the DeepSpeed launcher stops its ranks itself (SIGTERM, SIGKILL after 30 s)
        exit_now(interruptible(run_command, main, command=["python", *sys.argv]))
    exit_now(run_command(main))
