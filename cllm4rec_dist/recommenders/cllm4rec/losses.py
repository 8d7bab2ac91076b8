"""The three step losses of CLLM4Rec, each one forward pass of (model, batch) -> dict of scalars.

    L-step  (collaborative LLM): next-ITEM prediction over the MAIN item tokens, softmax over the J items.
    C-step  (content LLM):       next-TOKEN prediction over the MAIN text, softmax over the V vocab tokens.
    rec-step (RecLLM):           multinomial NLL of the held-out items from the last prompt token.

Each also adds the mutual regularisation (MR) that ties the side being trained to the other
side, held fixed (``regularize=False`` leaves it out: the paper's content-only warm-up). Every
function returns
    {"loss": lm + mr, "lm": the likelihood part, "mr": the MR part, "tokens": number of targets}.

MR comes from the prior z_content ~ N(z_collab, I / lambda_c): -log p = lambda_c/2 ||dz||^2 per
user/item, dz = z_trained - z_fixed.detach(). How the likelihood and the prior terms are reduced
over a batch of B documents sets how strong MR is against the likelihood; ``model.mr_reduction``
(``ModelConfig.mr_reduction``) picks one of three:

``paper`` (default): the paper's per-document objectives (Eqs. 7, 8, 10), averaged over documents.
    L/C: lm = 1/B sum_docs sum_{MAIN tokens} CE;  mr = 1/B sum_docs lambda_c/2 sum_{id tokens of the doc} ||dz||^2
    rec: lm = 1/B sum_users sum_{held-out j} -log softmax_j;
         mr = 1/B sum_users lambda_c/2 (||dz_user||^2 + sum_{j interacted} ||dz_j||^2)
         where "interacted" = the prompt's items AND the held-out targets, each counted once.
    lambda_c is the paper's prior precision; ~1 is its recommended start, and MR weighs against
    the document's whole likelihood, as in the paper, whatever the batch size.
``authors``: the authors' code (yaochenzhu/LLM4Rec): lm = mean CE over the batch's MAIN tokens
    (rec: 1/B sum_users NLL, as above), mr = lambda_c * sum over batch x length x d of dz^2
    (MSELoss(reduction='sum'); vocab positions cancel), i.e. lambda_c * sum over every id-token
    occurrence of the batch (rec: the prompt's and the held-out targets'). No 1/2; its strength
    grows with the batch size and the length. Pick it to reproduce their runs (their lambda = 1).
``token_mean``: lm = mean CE over MAIN tokens (rec: as above);
    mr = lambda_c/2 * mean over the id-token occurrences of the batch's inputs of ||dz||^2.
    MR on the per-token scale of the CE mean, independent of batch size and length; earlier
    versions of this project used it (it is ~T/2 times stronger than ``paper`` in the C-step, T =
    text length, ~n+1 times weaker in the rec-step, n = the user's items).
"""

from __future__ import annotations

import torch

from cllm4rec_dist.model.batch import LMBatch, RecBatch
from cllm4rec_dist.model.item_softmax import sparse_softmax_nll
from cllm4rec_dist.recommenders.cllm4rec.model import CLLM4Rec
from cllm4rec_dist.recommenders.cllm4rec.settings import MR_REDUCTIONS


def _enumerate_spans(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(document, offset) of every element when document k has ``counts[k]`` of them: offsets run 0..counts[k]-1."""
    docs = torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts)
    offsets = torch.arange(docs.shape[0], device=counts.device) - (torch.cumsum(counts, 0) - counts)[docs]
    return docs, offsets


def id_token_occurrences(batch: LMBatch | RecBatch, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(documents, token ids) of every user/item token of the batch's documents (padding excluded).

    Walks the documents through the batch's layout, so a packed row holding several documents
    gives each token the DOCUMENT it belongs to, not the row."""
    docs, offsets = _enumerate_spans(batch.lengths)
    tokens = batch.input_ids[batch.doc_rows[docs], batch.doc_starts[docs] + offsets]
    is_id = tokens >= vocab_size
    return docs[is_id], tokens[is_id]


def mutual_regularization(model: CLLM4Rec, id_tokens: torch.Tensor, num_docs: int, trained_side: str) -> torch.Tensor:
    """MR over ``id_tokens`` (one entry per prior term: a token id >= V) of a batch of ``num_docs``
    documents, reduced as ``model.config.mr_reduction`` says (module docstring)."""
    fixed_side = "content" if trained_side == "collab" else "collab"
    if id_tokens.numel() == 0 and not model.shards_across_ranks:  # sharded lookups are collective: never skipped
        return model.tables(trained_side)[0].weight.sum() * 0.0  # keeps the graph connected
    z_trained = model.id_embeddings(id_tokens, trained_side)
    z_fixed = model.id_embeddings(id_tokens, fixed_side).detach()
    squared_distance = (z_trained - z_fixed).pow(2).sum(dim=-1)
    lambda_c, reduction = model.config.lambda_c, model.config.mr_reduction
    if reduction == "paper":
        return lambda_c / 2 * squared_distance.sum() / max(num_docs, 1)
    if reduction == "authors":
        return lambda_c * squared_distance.sum()
    if reduction == "token_mean":
        return lambda_c / 2 * squared_distance.mean()
    raise ValueError(f"mr_reduction={reduction!r}; choose one of {', '.join(MR_REDUCTIONS)}")


def _no_mr(model: CLLM4Rec) -> torch.Tensor:
    return torch.zeros((), device=model.item_head_weight().device)


def _next_token_targets(batch: LMBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(docs, positions) predicting a MAIN token: position t of a document, t in [prompt_len-1, len-2],
    predicts its token t+1, so the first MAIN token is predicted from the last prompt position."""
    docs, offsets = _enumerate_spans(batch.lengths - batch.prompt_lengths)
    return docs, batch.prompt_lengths[docs] - 1 + offsets


def _main_lm_loss(model: CLLM4Rec, batch: LMBatch, side: str, nll, first_class: int,
                  num_classes: int, step: str, regularize: bool) -> dict:
    """Next-token CE over MAIN with classes ``first_class .. first_class+num_classes-1`` of the token
    space, ``nll(hidden, rows, cols)`` the summed softmax NLL over them (per-document sum averaged over
    documents for ``paper``, else the mean over target tokens) + MR of ``side`` to the other side over the
    documents' id tokens."""
    docs, positions = _next_token_targets(batch)
    hidden = model.document_hidden(batch, positions, docs, side=side)
    targets = batch.input_ids[batch.doc_rows[docs], batch.doc_starts[docs] + positions + 1] - first_class
    # checked on the device, without waiting for it (a host-side check would sync every step)
    torch._assert_async(((targets >= 0) & (targets < num_classes)).all(),
                        f"{step} MAIN tokens must all be ids {first_class} .. {first_class + num_classes - 1}")
    num_targets, num_docs = targets.numel(), batch.lengths.shape[0]
    nll_sum = nll(hidden, torch.arange(num_targets, device=hidden.device), targets)
    lm = nll_sum / max(num_docs if model.config.mr_reduction == "paper" else num_targets, 1)
    if regularize:
        mr = mutual_regularization(model, id_token_occurrences(batch, model.vocab_size)[1], num_docs,
                                   trained_side=side)
    else:
        mr = _no_mr(model)
    return {"loss": lm + mr, "lm": lm, "mr": mr, "tokens": num_targets}


def l_step_loss(model: CLLM4Rec, batch: LMBatch, regularize: bool = True) -> dict:
    """Collaborative LLM: CE of the next MAIN item over the J items only (item tokens V+I .. V+I+J-1,
    scored by the item head) + MR to the fixed content side."""
    return _main_lm_loss(model, batch, "collab", model.item_nll, model.item_offset, model.num_items,
                         "L-step (item tokens)", regularize)


def c_step_loss(model: CLLM4Rec, batch: LMBatch, regularize: bool = True) -> dict:
    """Content LLM: CE of the next MAIN text token over the V vocab tokens with the backbone's own
    (frozen) LM head + MR to the fixed collaborative side (``regularize=False`` in the warm-up)."""
    def vocab_nll(hidden, rows, cols):
        return sparse_softmax_nll(hidden, model.vocab_head_weight(), rows, cols,
                                  max_logit_elements=model.config.max_logit_elements)

    return _main_lm_loss(model, batch, "content", vocab_nll, 0, model.vocab_size, "C-step (vocab tokens)",
                         regularize)


def rec_prior_tokens(model: CLLM4Rec, batch: RecBatch) -> torch.Tensor:
    """The id tokens whose prior terms the rec-step's MR sums, per ``model.config.mr_reduction``:
    paper: per user, the user and every interacted item (prompt items and held-out targets) once;
    authors: every id-token occurrence of the prompt plus the held-out targets;
    token_mean: every id-token occurrence of the prompt."""
    docs, tokens = id_token_occurrences(batch, model.vocab_size)
    reduction = model.config.mr_reduction
    if reduction == "token_mean":
        return tokens
    docs = torch.cat([docs, batch.target_rows])
    tokens = torch.cat([tokens, batch.target_items + model.item_offset])
    if reduction == "authors":
        return tokens
    space = model.item_offset + model.num_items
    return torch.unique(docs * space + tokens) % space  # one prior term per (user, id token)


def rec_step_loss(model: CLLM4Rec, batch: RecBatch, regularize: bool = True) -> dict:
    """RecLLM: -sum_{j held out} log softmax(h_last . W_item^T)_j, mean over the users of the batch
    (h_last = hidden state of the last real prompt token) + MR to content (``rec_prior_tokens``)."""
    last_hidden = model.last_token_hidden(batch, side="collab")
    num_users = last_hidden.shape[0]
    lm = model.item_nll(last_hidden, batch.target_rows, batch.target_items) / max(num_users, 1)
    if regularize:
        mr = mutual_regularization(model, rec_prior_tokens(model, batch), num_users, trained_side="collab")
    else:
        mr = _no_mr(model)
    return {"loss": lm + mr, "lm": lm, "mr": mr, "tokens": int(batch.target_items.numel())}
