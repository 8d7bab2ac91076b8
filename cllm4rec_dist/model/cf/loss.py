"""The stage-0 training objective shared by every sequential CF model (SASRec's, from its paper).

For each position t of a training sequence the model's output scores the true next item
(``positives[:, t]``) against one sampled negative (``negatives[:, t]``) with binary
cross-entropy; padded positions (``positives == PAD``) do not count. The loss is the mean over
the real positions of ``-log sigmoid(s_pos) - log(1 - sigmoid(s_neg))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cllm4rec_dist.model.cf import PAD, SequentialCF


def next_item_bce(model: SequentialCF, inputs: torch.Tensor, positives: torch.Tensor,
                  negatives: torch.Tensor) -> torch.Tensor:
    """Mean BCE of the next item vs one negative per position; all three tensors ``[B, L]``, left-padded."""
    outputs = model.sequence_output(inputs)
    items = model.item_embeddings()
    real = positives != PAD
    out = outputs[real]
    pos_logits = (out * items[positives[real]]).sum(-1)
    neg_logits = (out * items[negatives[real]]).sum(-1)
    return (F.binary_cross_entropy_with_logits(pos_logits, torch.ones_like(pos_logits), reduction="sum")
            + F.binary_cross_entropy_with_logits(neg_logits, torch.zeros_like(neg_logits),
                                                 reduction="sum")) / real.sum()


def draw_training_negatives(histories: list[list[int]], targets: torch.Tensor, num_items: int,
                     generator: torch.Generator) -> torch.Tensor:
    """``[B, L]`` items drawn uniformly from those NOT in each user's history (PAD where ``targets`` is PAD).

    ``histories[b]`` is the full item list of row b's user (what must not be drawn).
    """
    batch, length = targets.shape
    seen = torch.zeros(batch, num_items, dtype=torch.bool)
    for row, items in enumerate(histories):
        seen[row, torch.as_tensor(items, dtype=torch.long)] = True
    negatives = torch.randint(num_items, (batch, length), generator=generator)
    rows = torch.arange(batch)[:, None].expand(batch, length)
    clash = seen[rows, negatives]
    while clash.any():  # redraw the clashes only; a user never holds the whole catalogue (checked by the caller)
        negatives[clash] = torch.randint(num_items, (int(clash.sum()),), generator=generator)
        clash = seen[rows, negatives]
    return negatives.masked_fill(targets == PAD, PAD)
