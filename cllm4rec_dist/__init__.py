"""cllm4rec_dist: distributed training of LLM-based recommenders (CLLM4Rec, A-LLMRec).

Importing the package sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already sets it, so that it
takes effect when torch loads its OpenMP runtime (import this package before torch, as the CLI does; Ray,
DeepSpeed and torchrun workers inherit the variable). Why: libgomp's default lets a thread that reaches the
end of a parallel region spin for its partner. When the cores are shared with other processes (a loaded
machine, several ranks on few cores), the partner is often descheduled, and every elementwise op of a
step then waits a scheduler time slice (measured: docs/experiments/2026-11-30-smollm2-cpu-steps.md).
Passive threads sleep at once; on an idle machine this costs a wake-up (microseconds) per parallel op.
Set ``OMP_WAIT_POLICY=ACTIVE`` to keep spinning.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

COMMAND = "cllm4rec"
"""The command-line program's name (reproduction lines in reports, `prog` of the CLI)."""
