"""Pretrain + finetune CLLM4Rec with Ray Train workers running DeepSpeed ZeRO engines.

    python launchers/pretrain_llama.py                       # the embedded default: demo data, local Ray, CPU
    ray job submit -- python launchers/pretrain_llama.py --config configs/my_cluster.yaml

With no running cluster a local Ray is started in-process. Every setting is a
key of the --config YAML or a `--section.field VALUE` flag (see --help).
"""

import sys

from cllm4rec_dist.errors import run_command
from cllm4rec_dist.launch import ensure_demo_data, finish, parse
from cllm4rec_dist.train.distributed import launch_ray


def main(argv=None) -> int:
    cfg, args = parse(__doc__, argv)
    ensure_demo_data(cfg)
    return finish(cfg, args, launch_ray(cfg))


if __name__ == "__main__":
    sys.exit(run_command(main))
