"""Write a preprocessed dataset (and its GPT-2 backbone) in the input layout of the authors' CLLM4Rec code.

The reference implementation (github.com/yaochenzhu/LLM4Rec, ``src/training.py`` and ``src/finetuning.py``)
reads everything below one storage root::

    dataset/<name>/meta.pkl                      {"num_users": I, "num_items": J}
    dataset/<name>/user_item_texts/review.pkl    [(prompt text, main text), ...]   the content corpus
    dataset/<name>/train_matrix.npz              users x items, scipy CSR (the collaborative corpus)
    dataset/<name>/val_matrix.npz                users x items, scipy CSR (validation while finetuning)
    model/pretrained/tokenizer/vocab_file.json   GPT-2 byte-level BPE vocabulary ...
    model/pretrained/tokenizer/merges.txt        ... and merges
    model/pretrained/gpt2/pytorch_model.bin      a GPT2Model state dict (their code loads it with torch.load)

Texts are OUR documents decoded back to text with the backbone's own tokenizer (id tokens written as
``user_<i>`` / ``item_<j>``, which their tokenizer maps to the same ids V + i / V + I + j that ours uses),
so both implementations train on the same documents with the same vocabulary. Their tokenizer drops the
``<s>`` / ``</s>`` our documents carry.

    python benchmarks/llm4rec_format.py --data shards/demo-gpt2 --root /tmp/llm4rec-root --name demo
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cllm4rec_dist.corpus.shards import ShardedDataset  # noqa: E402


def id_token_text(token: int, vocab: int, num_users: int) -> str | None:
    """``user_<i>`` / ``item_<j>`` for an id token of our layout (V + i, V + I + j); None for a vocab token."""
    if token < vocab:
        return None
    return f"user_{token - vocab}" if token < vocab + num_users else f"item_{token - vocab - num_users}"


def decode_with_ids(tokens: list[int], tokenizer, vocab: int, num_users: int) -> str:
    """Text of a token-id list: vocab runs decoded by the tokenizer, id tokens as their words."""
    pieces, run = [], []
    for token in tokens:
        word = id_token_text(token, vocab, num_users)
        if word is None:
            run.append(token)
            continue
        if run:
            pieces.append(tokenizer.decode(run, skip_special_tokens=True))
            run = []
        pieces.append(word if not pieces or pieces[-1].endswith(" ") else f" {word}")
    if run:
        pieces.append(tokenizer.decode(run, skip_special_tokens=True))
    return "".join(pieces).strip()


def interaction_matrix(docs: list[dict], field: str, num_users: int, num_items: int):
    from scipy.sparse import csr_matrix

    rows = [d["user"] for d in docs for _ in d[field]]
    cols = [i for d in docs for i in d[field]]
    return csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(num_users, num_items))


def write_authors_layout(data_dir: str, root: str, name: str) -> dict:
    """Write ``data_dir`` (a GPT-2-tokenised preprocessed dataset) under ``root``; returns corpus sizes."""
    import torch
    from scipy.sparse import save_npz
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, GPT2Model

    data = ShardedDataset(data_dir)
    backbone = data.manifest["backbone"]
    if backbone.get("model_type") != "gpt2":
        raise SystemExit(f"{data_dir}: backbone is {backbone.get('model_type')!r}; the authors' code is GPT-2 only. "
                         "Preprocess with --backbone tiny-gpt2 (or a GPT-2 checkpoint).")
    num_users, J, V = data.num_users, data.num_items, data.vocab_size
    tokenizer = AutoTokenizer.from_pretrained(backbone["path"], local_files_only=True)
    if len(tokenizer) != V:
        raise SystemExit(f"{data_dir}: tokenizer has {len(tokenizer)} tokens, the dataset's vocab_size is {V}")

    dataset = os.path.join(root, "dataset", name)
    os.makedirs(os.path.join(dataset, "user_item_texts"), exist_ok=True)
    with open(os.path.join(dataset, "meta.pkl"), "wb") as f:
        pickle.dump({"num_users": num_users, "num_items": J}, f)
    content = [(decode_with_ids(d["prompt"], tokenizer, V, num_users),
                decode_with_ids(d["main"], tokenizer, V, num_users))
               for d in data.read_corpus("content")]
    with open(os.path.join(dataset, "user_item_texts", "review.pkl"), "wb") as f:
        pickle.dump(content, f)
    evals = data.read_corpus("eval")
    save_npz(os.path.join(dataset, "train_matrix.npz"), interaction_matrix(evals, "train", num_users, J))
    save_npz(os.path.join(dataset, "val_matrix.npz"), interaction_matrix(evals, "valid", num_users, J))

    tok_dir = os.path.join(root, "model", "pretrained", "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    Tokenizer.from_file(os.path.join(backbone["path"], "tokenizer.json")).model.save(tok_dir)
    os.replace(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "vocab_file.json"))

    gpt2_dir = os.path.join(root, "model", "pretrained", "gpt2")
    gpt2 = GPT2Model.from_pretrained(backbone["path"], local_files_only=True)  # the transformer without LM head
    gpt2.config.save_pretrained(gpt2_dir)
    torch.save(gpt2.state_dict(), os.path.join(gpt2_dir, "pytorch_model.bin"))
    for part in ("content", "collaborative", "rec"):  # where their scripts save the tables (fsspec: no mkdir)
        os.makedirs(os.path.join(root, "model", name, part), exist_ok=True)
    return {"num_users": num_users, "num_items": J, "vocab": V, "content_docs": len(content),
            "train_interactions": int(sum(len(d["train"]) for d in evals))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="preprocessed dataset folder (GPT-2 backbone)")
    p.add_argument("--root", required=True, help="storage root to write (their LLM4REC_SERVER_ROOT)")
    p.add_argument("--name", default="demo", help="dataset name (their --dataset)")
    args = p.parse_args(argv)
    print(write_authors_layout(args.data, args.root, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
