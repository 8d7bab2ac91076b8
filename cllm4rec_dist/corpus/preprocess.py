"""`cllm4rec preprocess`: raw files -> protocol -> corpus documents -> webdataset shards + manifest."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace

from cllm4rec_dist.corpus.documents import CORPORA, DocumentBuilder, Templates, num_tokens
from cllm4rec_dist.corpus.ids import TokenSpace
from cllm4rec_dist.corpus.presets import PRESETS, load_config, load_tokenizer, resolve_backbone
from cllm4rec_dist.corpus.sequences import ITEMS_FILE, SEQ_CORPUS, items_table, sequence_documents, sequence_length
from cllm4rec_dist.corpus.shards import DatasetWriter, ShardPlan
from cllm4rec_dist.data.protocol import GIVEN, SPLITS, ProtocolConfig, Split, apply_protocol
from cllm4rec_dist.data.readers import READERS, ReaderOptions, read_dataset
from cllm4rec_dist.data.records import InputError, InputReport
from cllm4rec_dist.resources import DEMO_DATASETS, demo_data_dir


@dataclass
class PreprocessConfig:
    """Everything that decides the bytes of a preprocessed dataset."""

    format: str
    options: ReaderOptions
    out: str
    backbone: str = "tiny-llama"
    """A preset (built into OUT/backbone), `smollm2`, or a local HF checkpoint folder: its tokenizer and vocab size."""
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    templates: Templates = field(default_factory=Templates)
    max_text_tokens: int = 256
    strict: bool = False
    shard_plan: ShardPlan = field(default_factory=ShardPlan)


def _log(msg: str) -> None:
    print(f"[preprocess] {msg}", flush=True)


def count_docs(name: str, split: Split) -> int:
    if name == "content":
        return len(split.reviews) + len(split.user_texts) + len(split.item_texts)
    return split.num_users


def tokenizer_identity(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), separators=(",", ":"))
    return hashlib.sha256(vocab.encode()).hexdigest()


def demo_dataset(data: str) -> str:
    """The dataset folder a training config's ``data`` names, the embedded demos built on first use.

    ``shards/demo`` and ``shards/demo-loo`` (A-LLMRec's leave-one-out demo; resources.DEMO_DATASETS) with no
    dataset at that path in the working directory mean the project's own copy, written once (synthetic data +
    tiny backbone, that demo's split). Any other ``data`` is returned as given. Every training entry point calls
    it before its first worker starts: `cllm4rec train` and the Ray launcher alike.
    """
    name = os.path.normpath(data)
    split = DEMO_DATASETS.get(name)
    if split is None or os.path.exists(os.path.join(data, "manifest.json")):
        return data
    data = demo_data_dir(name)
    if os.path.exists(os.path.join(data, "manifest.json")):
        return data
    from cllm4rec_dist.data.demo import DemoConfig, write

    raw = f"{data}-raw"
    _log(f"no dataset at {data}: writing the synthetic demo to {raw} and preprocessing it ({split} split)")
    write(raw, DemoConfig())
    preprocess(PreprocessConfig(format="table", options=ReaderOptions(inputs=[raw]), out=data,
                                protocol=ProtocolConfig(split=split)))
    return data


def given_protocol(cfg: PreprocessConfig, given_split: str | None) -> ProtocolConfig:
    """The protocol a dataset is processed with: ``cfg.protocol``, or for a reader whose data holds the split
    (``RawDataset.given_split``) the same settings with the data's split kind and no binarising and no k-core, so
    the manifest says what was done. ``--split leave-one-out`` on a given full-ranking split is refused there
    (``apply_given_split``): that would be a re-split."""
    if given_split is None:
        return cfg.protocol
    split = given_split if cfg.protocol.split == ProtocolConfig.split else cfg.protocol.split
    _log(f"--format {cfg.format} holds its own {given_split} split: used as given (no binarising, no k-core, "
         "no re-split; --min-rating, --kcore, --valid/--test-fraction and --seed's split do not apply)")
    return replace(cfg.protocol, split=split, binarize=False, kcore=0)


def preprocess(cfg: PreprocessConfig) -> dict:
    """Run the whole pipeline; returns the statistics (also written to OUT/stats.json)."""
    t0 = time.time()
    report = InputReport(strict=cfg.strict)
    raw = read_dataset(cfg.format, cfg.options, report)
    _log(f"read {len(raw.interactions)} interactions ({report.as_dict()['skipped_total']} lines skipped) "
         f"in {time.time() - t0:.1f}s")
    for example in report.examples:
        _log(f"  skipped: {example}")

    protocol = given_protocol(cfg, raw.given_split)
    split = apply_protocol(raw, protocol)
    _log(f"protocol: {split.num_users} users, {split.num_items} items, {split.stats['num_interactions']} interactions "
         f"(train {split.stats['num_train']} / valid {split.stats['num_valid']} / test {split.stats['num_test']})")

    is_local = "://" not in cfg.out or cfg.out.startswith("file://")
    build_dir = os.path.join(cfg.out, "backbone") if is_local else os.path.join(".cache", "backbones", cfg.backbone)
    location = resolve_backbone(cfg.backbone, build_dir if cfg.backbone in PRESETS else None)
    tokenizer = load_tokenizer(location)
    backbone_config = load_config(location)
    vocab_size = int(backbone_config.vocab_size)
    if len(tokenizer) > vocab_size:
        raise InputError(f"backbone {location['path']}: tokenizer has {len(tokenizer)} tokens but the model's "
                         f"vocab_size is {vocab_size}; user/item ids would collide with vocab ids.")
    space = TokenSpace(vocab_size, split.num_users, split.num_items)
    builder = DocumentBuilder(tokenizer, space, cfg.templates, cfg.max_text_tokens)

    writer = DatasetWriter(cfg.out, cfg.shard_plan)
    writer.write_json("id_maps.json", {"users": split.user_ids, "items": split.item_ids})
    writer.write_json(ITEMS_FILE, items_table(split))
    corpora = [(name, builder.corpus(name, split), num_tokens) for name in CORPORA]
    if protocol.split == "leave-one-out":
        corpora.append((SEQ_CORPUS, sequence_documents(split), sequence_length))
    for name, docs, count_tokens in corpora:
        entry = writer.write_corpus(name, docs, count_docs(name, split), count_tokens)
        _log(f"corpus {name}: {entry['num_docs']} documents, {entry['num_tokens']} tokens, "
             f"{len(entry['shards'])} shards, {sum(s['bytes'] for s in entry['shards']) / 1e6:.2f} MB")

    stats = {
        "dataset": raw.name,
        "format": cfg.format,
        **{k: v for k, v in split.stats.items() if k != "protocol"},
        "items_without_title": split.num_items - len(split.item_titles),
        "num_content_documents": writer.corpora["content"]["num_docs"],
        "num_collab_documents": writer.corpora["collab"]["num_docs"],
        "content_documents_truncated": builder.truncated,
        "tokens": {name: writer.corpora[name]["num_tokens"] for name in CORPORA},
        "shard_bytes": {name: sum(s["bytes"] for s in entry["shards"]) for name, entry in writer.corpora.items()},
        "input": report.as_dict(),
    }
    writer.write_json("stats.json", stats)
    writer.finalize({
        "name": raw.name,
        "num_users": split.num_users,
        "num_items": split.num_items,
        "vocab_size": vocab_size,
        "backbone": {"spec": cfg.backbone, "path": location["path"], "gguf_file": location["gguf_file"],
                     "tokenizer_sha256": tokenizer_identity(tokenizer),
                     "model_type": getattr(backbone_config, "model_type", None)},
        "protocol": asdict(protocol),
        **({"split_source": GIVEN} if raw.given_split else {}),
        "cold_items": split.stats["cold_items"],
        "templates": asdict(cfg.templates),
        "max_text_tokens": cfg.max_text_tokens,
    })
    stats["seconds"] = round(time.time() - t0, 2)
    _log(f"done in {stats['seconds']}s -> {cfg.out}")
    return stats


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = (
        "Read raw interactions (+ texts), apply the paper's protocol (binarise rating > 3, 5-core, per-user "
        "80/10/10 split, or --split leave-one-out with stored candidates), build the collaborative, content, "
        "rec and eval documents as token ids (and, for leave-one-out, the seq corpus), and write them as "
        "webdataset shards with a manifest.\n\nformats:\n"
        + "\n".join(f"  {name:15s} {help_}" for name, (_, help_) in READERS.items())
        + "\n\nexamples:\n"
        "  cllm4rec preprocess --format movielens --input ../shared/data/movielens-100k --out shards/ml-100k\n"
        "  cllm4rec preprocess --format movielens --input ../shared/data/movielens-100k --split leave-one-out\n"
        "  cllm4rec preprocess --format amazon --input All_Beauty_5.json.gz --meta meta_All_Beauty.json.gz\n"
        "  cllm4rec preprocess --format table --input raw/ --user-col uid --item-col iid --out s3://bucket/ds\n"
        "  cllm4rec preprocess --format split-npz --input ../shared/data/amazon-cllm4rec-split/beauty "
        "--out shards/beauty-split\n"
        "  cllm4rec preprocess --format sequences-json --input ../shared/data/amazon-2014-titles/games "
        "--out shards/games\n"
        "  cllm4rec preprocess --format s3rec --input ../shared/data/amazon-5core-seq-s3rec/Beauty.txt "
        "--item-titles ../shared/data/amazon-2014-titles/beauty_items.json --split leave-one-out"
    )
    p.add_argument("--format", required=True, help=f"input format: {', '.join(READERS)}")
    p.add_argument("--input", action="append", required=True,
                   help="input file or folder (repeatable; fsspec URLs work)")
    p.add_argument("--meta", action="append", default=[], help="side file, e.g. Amazon item metadata (repeatable)")
    p.add_argument("--item-titles", help="--format s3rec: JSON map item id -> title (or {\"asin\", \"title\"}), "
                                         "e.g. amazon-2014-titles/beauty_items.json")
    p.add_argument("--out", help="output folder or fsspec URL (default: shards/<input name>)")
    p.add_argument("--backbone", default="tiny-llama",
                   help=f"tokenizer source: a preset ({', '.join(PRESETS)}), 'smollm2', "
                        "or a local HF checkpoint folder")
    g = p.add_argument_group("protocol (paper defaults)")
    g.add_argument("--min-rating", type=float, default=ProtocolConfig.min_rating, help="keep rating > this")
    g.add_argument("--no-binarize", action="store_true", help="keep every rating")
    g.add_argument("--kcore", type=int, default=ProtocolConfig.kcore, help="iterative k-core filter (0 disables)")
    g.add_argument("--valid-fraction", type=float, default=ProtocolConfig.valid_fraction)
    g.add_argument("--test-fraction", type=float, default=ProtocolConfig.test_fraction)
    g.add_argument("--seed", type=int, default=ProtocolConfig.seed, help="seed of the random split")
    g.add_argument("--split", choices=SPLITS, default=ProtocolConfig.split,
                   help="random: per-user seeded valid/test fractions (CLLM4Rec); leave-one-out: per user in time "
                        "order, last = test, second last = valid, with stored candidates (A-LLMRec, SASRec). "
                        "split-npz / sequences-json hold their own split, used as given")
    g.add_argument("--num-negatives", type=int, default=ProtocolConfig.num_negatives,
                   help="leave-one-out: never-interacted items sampled next to each valid/test positive")
    g.add_argument("--candidate-seed", type=int, default=ProtocolConfig.candidate_seed,
                   help="leave-one-out: seed of the candidate sampling")
    g.add_argument("--max-train-per-user", type=int, default=ProtocolConfig.max_train_per_user,
                   help="sparse regime: keep at most K train interactions per user (a random subset seeded by "
                        "--seed and the user; validation and test untouched; 0 = all)")
    g.add_argument("--cold-item-fraction", type=float, default=ProtocolConfig.cold_item_fraction,
                   help="hold this share of items out of training entirely (seeded); they are scored from their "
                        "content alone and reported as their own slice (`cold` metrics)")
    g = p.add_argument_group("documents and shards")
    g.add_argument("--max-text-tokens", type=int, default=256, help="cut longer review/bio/item texts")
    g.add_argument("--min-shards", type=int, default=ShardPlan.min_shards, help="at least this many shards per corpus")
    g.add_argument("--max-docs-per-shard", type=int, default=ShardPlan.max_docs_per_shard)
    g.add_argument("--strict", action="store_true", help="fail on the first bad input line instead of skipping it")
    g = p.add_argument_group("--format table columns")
    for flag, default in (("user-col", "user"), ("item-col", "item"), ("rating-col", "rating"),
                          ("timestamp-col", "timestamp"), ("review-col", "review"),
                          ("user-text-col", "user_text"), ("item-text-col", "item_text"),
                          ("item-title-col", "item_title")):
        g.add_argument(f"--{flag}", default=default)


def config_from_args(args) -> PreprocessConfig:
    name = os.path.basename(os.path.normpath(args.input[0])).split(".")[0] or "dataset"
    options = ReaderOptions(
        inputs=args.input, meta=args.meta, user_col=args.user_col, item_col=args.item_col,
        rating_col=args.rating_col, timestamp_col=args.timestamp_col, review_col=args.review_col,
        user_text_col=args.user_text_col, item_text_col=args.item_text_col, item_title_col=args.item_title_col,
        item_titles=args.item_titles,
    )
    protocol = ProtocolConfig(binarize=not args.no_binarize, min_rating=args.min_rating, kcore=args.kcore,
                              valid_fraction=args.valid_fraction, test_fraction=args.test_fraction, seed=args.seed,
                              split=args.split, num_negatives=args.num_negatives, candidate_seed=args.candidate_seed,
                              max_train_per_user=args.max_train_per_user,
                              cold_item_fraction=args.cold_item_fraction)
    return PreprocessConfig(
        format=args.format, options=options, out=args.out or os.path.join("shards", name), backbone=args.backbone,
        protocol=protocol, max_text_tokens=args.max_text_tokens, strict=args.strict,
        shard_plan=ShardPlan(args.min_shards, args.max_docs_per_shard),
    )


def run(args) -> int:
    stats = preprocess(config_from_args(args))
    keys = ("num_users", "num_items", "num_interactions", "num_train", "num_valid", "num_test", "num_content_documents",
            "users_evaluated", "items_without_title")
    print(json.dumps({k: stats[k] for k in keys if k in stats} | {"seconds": stats["seconds"]}, indent=1))
    return 0
