"""The choices the model settings validate (precisions, table shardings, the item-softmax chunk budget), without
importing torch or transformers: the driver of a Ray run parses and checks its config before Ray starts, and
pays for those libraries only where it uses them (the modules that do re-export these names)."""

PRECISIONS = ("fp32", "bf16", "int8", "nf4")
QUANTISED = ("int8", "nf4")
TABLE_SHARDINGS = ("replicated", "row")
"""replicated: every rank holds every row (DeepSpeed ZeRO partitions only gradients and Adam state);
row: every rank holds 1/W of the rows and the Adam state of those rows only."""
DEFAULT_MAX_LOGIT_ELEMENTS = 2**24  # 16M float32 logits = 64 MiB per chunk
CF_MODEL_NAMES = ("sasrec", "gru4rec")
"""The sequential CF models (model/cf: ``CF_MODELS`` maps each to its class, and checks it covers exactly these)."""
