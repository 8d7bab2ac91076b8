"""Pretrain + finetune CLLM4Rec with Ray Train workers running DeepSpeed ZeRO engines.

    python launchers/pretrain_llama.py                       # the embedded default: demo data, local Ray, CPU
    ray job submit -- python launchers/pretrain_llama.py --config configs/my_cluster.yaml

With no running cluster a local Ray is started in-process. Every setting is a
key of the --config YAML or a `--section.field VALUE` flag (see --help).
"""

import sys

from cllm4rec_dist.launch import ensure_demo_data, export_run, parse, summary
from cllm4rec_dist.train.distributed import launch_ray


def main(argv=None) -> int:
    cfg, args = parse(__doc__, argv)
    ensure_demo_data(cfg)
    result = launch_ray(cfg)
    if not args.no_export:
        result["export"] = export_run(cfg)
    print(summary(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
