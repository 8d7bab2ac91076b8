"""The three step losses of CLLM4Rec, each one forward pass of (model, batch) -> dict of scalars.

    L-step  (collaborative LLM): next-ITEM prediction over the MAIN item tokens, softmax over the J items.
    C-step  (content LLM):       next-TOKEN prediction over the MAIN text, softmax over the V vocab tokens.
    rec-step (RecLLM):           multinomial NLL of the held-out items from the last prompt token.

Each also adds the mutual regularisation (MR) that ties the side being trained to the other
side, held fixed. Every function returns
    {"loss": lm + mr, "lm": the likelihood part, "mr": the MR part, "tokens": number of targets}.

MR normalisation. The prior z_content ~ N(z_collab, I / lambda_c) contributes
lambda_c/2 * ||z_collab - z_content||^2 for each user/item token. We AVERAGE that over the
user/item token occurrences of the batch (prompt + main, padding excluded):

    mr = lambda_c/2 * mean over id-token occurrences of sum_d (z_trained - z_fixed.detach())^2

The reference code sums it over batch x length x d (MSE reduction='sum'), so its weight relative
to the CE (a mean) grows with the batch size and the document length, and the lambda_c that
works depends on both. Per-occurrence averaging puts MR on the same per-token scale as the CE
mean: lambda_c ~ 1 plays the role the paper gives it, whatever the batch size or length.
"""

from __future__ import annotations

import torch

from .batch import LMBatch, RecBatch
from .cllm4rec import CLLM4Rec
from .item_softmax import sparse_softmax_nll


def mutual_regularization(model: CLLM4Rec, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          trained_side: str) -> torch.Tensor:
    """lambda_c/2 * mean over the user/item tokens of the batch of ||z_trained - z_other.detach()||^2."""
    fixed_side = "content" if trained_side == "collab" else "collab"
    id_tokens = input_ids[(input_ids >= model.vocab_size) & attention_mask.bool()]
    if id_tokens.numel() == 0:
        return model.tables(trained_side)[0].weight.sum() * 0.0  # keeps the graph connected
    z_trained = model.id_embeddings(id_tokens, trained_side)
    z_fixed = model.id_embeddings(id_tokens, fixed_side).detach()
    squared_distance = (z_trained - z_fixed).pow(2).sum(dim=-1)
    return model.config.lambda_c / 2 * squared_distance.mean()


def _next_token_targets(batch: LMBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(docs, positions) predicting a MAIN token: position t of a document, t in [prompt_len-1, len-2],
    predicts its token t+1, so the first MAIN token is predicted from the last prompt position."""
    counts = batch.lengths - batch.prompt_lengths
    docs = torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts)
    first_of_doc = torch.cumsum(counts, 0) - counts
    offsets = torch.arange(docs.shape[0], device=counts.device) - first_of_doc[docs]
    return docs, batch.prompt_lengths[docs] - 1 + offsets


def _main_lm_loss(model: CLLM4Rec, batch: LMBatch, side: str, head: torch.Tensor, first_class: int,
                  num_classes: int, step: str) -> dict:
    """Next-token CE over MAIN with classes ``first_class .. first_class+num_classes-1`` of the token
    space scored by ``head`` (mean over target tokens) + MR of ``side`` to the other side."""
    docs, positions = _next_token_targets(batch)
    hidden = model.document_hidden(batch, positions, docs, side=side)
    targets = batch.input_ids[batch.doc_rows[docs], batch.doc_starts[docs] + positions + 1] - first_class
    # checked on the device, without waiting for it (a host-side check would sync every step)
    torch._assert_async(((targets >= 0) & (targets < num_classes)).all(),
                        f"{step} MAIN tokens must all be ids {first_class} .. {first_class + num_classes - 1}")
    num_targets = targets.numel()
    lm = sparse_softmax_nll(hidden, head, rows=torch.arange(num_targets, device=hidden.device),
                            cols=targets, max_logit_elements=model.config.max_logit_elements) / max(num_targets, 1)
    mr = mutual_regularization(model, batch.input_ids, batch.attention_mask, trained_side=side)
    return {"loss": lm + mr, "lm": lm, "mr": mr, "tokens": num_targets}


def l_step_loss(model: CLLM4Rec, batch: LMBatch) -> dict:
    """Collaborative LLM: CE of the next MAIN item over the J items only (item tokens V+I .. V+I+J-1,
    scored by the item head) + MR to the fixed content side."""
    return _main_lm_loss(model, batch, "collab", model.item_head_weight(), model.item_offset, model.num_items,
                         "L-step (item tokens)")


def c_step_loss(model: CLLM4Rec, batch: LMBatch) -> dict:
    """Content LLM: CE of the next MAIN text token over the V vocab tokens with the backbone's own
    (frozen) LM head + MR to the fixed collaborative side."""
    return _main_lm_loss(model, batch, "content", model.vocab_head_weight(), 0, model.vocab_size,
                         "C-step (vocab tokens)")


def rec_step_loss(model: CLLM4Rec, batch: RecBatch) -> dict:
    """RecLLM: -sum_{j held out} log softmax(h_last . W_item^T)_j, mean over the users of the batch
    (h_last = hidden state of the last real prompt token) + MR to content over the prompt's id tokens."""
    last_hidden = model.last_token_hidden(batch, side="collab")
    num_users = last_hidden.shape[0]
    lm = sparse_softmax_nll(last_hidden, model.item_head_weight(), rows=batch.target_rows,
                            cols=batch.target_items,
                            max_logit_elements=model.config.max_logit_elements) / max(num_users, 1)
    mr = mutual_regularization(model, batch.input_ids, batch.attention_mask, trained_side="collab")
    return {"loss": lm + mr, "lm": lm, "mr": mr, "tokens": int(batch.target_items.numel())}
