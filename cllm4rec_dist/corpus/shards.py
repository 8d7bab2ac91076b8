"""Corpus documents in webdataset tar shards, through fsspec (local paths or any fsspec URL).

Layout of a preprocessed dataset folder::

    manifest.json        written LAST: its presence means the dataset is complete
    stats.json           the protocol / input statistics
    id_maps.json         {"users": [original ids], "items": [original ids]}
    collab-000000.tar    webdataset shards, one sample per document: <key>.json
    content-000000.tar ...

Every file is written under a temporary name and renamed into place, and the
manifest records each shard's size and sha256: a reader checks both, so a
partial or foreign shard is never read as a whole one.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import posixpath
from dataclasses import dataclass

import fsspec
import numpy as np
from webdataset import tariterators
from webdataset.writer import TarWriter

from cllm4rec_dist.atomic import atomic_write
from cllm4rec_dist.atomic import url_to_fs as _fs
from cllm4rec_dist.corpus.split import EvalSplit
from cllm4rec_dist.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "cllm4rec-shards"
VERSION = 1


# Document fields holding item indices (``item`` may be -1: no item; ``user`` too) and token ids, checked on
# every read.
ITEM_FIELDS = ("item", "items", "train", "valid", "test", "history", "valid_candidates", "test_candidates")
TOKEN_FIELDS = ("prompt", "main", "prompt_prefix", "prompt_suffix")


class ShardError(UserError, RuntimeError):
    """A dataset folder that is missing, incomplete or corrupt; the message says what to re-run."""


def canonical_json(obj) -> bytes:
    """The one serialisation used for documents and metadata (sorted keys, no spaces): reruns are byte-identical."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shard_bytes(name: str, start: int, docs: list[dict]) -> bytes:
    """One webdataset tar holding ``docs`` as ``<name>-<index>.json`` samples, deterministic bytes."""
    buf = io.BytesIO()
    with TarWriter(buf, mtime=0, encoder=False) as writer:
        for k, doc in enumerate(docs):
            writer.write({"__key__": f"{name}-{start + k:09d}", "json": canonical_json(doc)})
    return buf.getvalue()


@dataclass
class ShardPlan:
    """How many documents go into one shard: at least ``min_shards`` shards (for many workers), at most ``max_docs``
    per shard."""

    min_shards: int = 8
    max_docs_per_shard: int = 5000

    def docs_per_shard(self, num_docs: int) -> int:
        return max(1, min(self.max_docs_per_shard, math.ceil(num_docs / self.min_shards)))


class DatasetWriter:
    """Writes the shards of each corpus, then the manifest last."""

    def __init__(self, url: str, plan: ShardPlan | None = None):
        self.url = url
        self.fs, self.root = _fs(url)
        self.fs.makedirs(self.root, exist_ok=True)
        self.plan = plan or ShardPlan()
        self.corpora: dict[str, dict] = {}
        self.files: dict[str, dict] = {}

    def write_corpus(self, name: str, docs, num_docs: int, count_tokens) -> dict:
        """Stream ``docs`` (an iterable of ``num_docs`` dicts) into shards; returns the manifest entry."""
        per_shard = self.plan.docs_per_shard(num_docs)
        shards, batch, written, tokens_total = [], [], 0, 0

        def flush():
            nonlocal batch, written, tokens_total
            data = shard_bytes(name, written, batch)
            path = f"{name}-{len(shards):06d}.tar"
            atomic_write(self.fs, posixpath.join(self.root, path), data)
            tokens = sum(count_tokens(d) for d in batch)
            shards.append({"path": path, "num_docs": len(batch), "num_tokens": tokens,
                           "bytes": len(data), "sha256": sha256(data)})
            written += len(batch)
            tokens_total += tokens
            batch = []

        for doc in docs:
            batch.append(doc)
            if len(batch) == per_shard:
                flush()
        if batch:
            flush()
        if written != num_docs:
            raise RuntimeError(f"corpus {name}: expected {num_docs} documents, got {written}")
        entry = {"num_docs": written, "num_tokens": tokens_total, "shards": shards}
        self.corpora[name] = entry
        return entry

    def write_json(self, name: str, obj) -> dict:
        data = canonical_json(obj)
        atomic_write(self.fs, posixpath.join(self.root, name), data)
        self.files[name] = {"path": name, "bytes": len(data), "sha256": sha256(data)}
        return self.files[name]

    def finalize(self, meta: dict) -> dict:
        """Write manifest.json (last, atomically). ``meta`` holds sizes, backbone, protocol, templates."""
        digest = hashlib.sha256()
        for name in sorted(self.corpora):
            for shard in self.corpora[name]["shards"]:
                digest.update(shard["sha256"].encode())
        for name in sorted(self.files):
            digest.update(self.files[name]["sha256"].encode())
        manifest = {"format": FORMAT, "version": VERSION, **meta, "corpora": self.corpora,
                    "files": self.files, "content_hash": digest.hexdigest()}
        atomic_write(self.fs, posixpath.join(self.root, MANIFEST),
                     json.dumps(manifest, sort_keys=True, indent=1).encode())
        return manifest


class ShardedDataset:
    """A preprocessed dataset folder: its manifest, and verified reads of its shards."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = _fs(url)
        path = posixpath.join(self.root, MANIFEST)
        if not self.fs.exists(path):
            raise ShardError(f"{url}: no {MANIFEST}. This folder is not a finished preprocessed dataset; "
                             "run `cllm4rec preprocess ... --out` to (re)create it.")
        if self.fs.isdir(path):
            raise ShardError(f"{path}: a folder, not a manifest file; re-run `cllm4rec preprocess ... --out`.")
        try:
            self.manifest = json.loads(self.fs.cat_file(path))
        except (ValueError, UnicodeDecodeError) as err:
            raise ShardError(f"{path}: not valid JSON ({err}); the manifest is half-written or was edited. Re-run "
                             "`cllm4rec preprocess`.") from None
        if (not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT
                or self.manifest.get("version") != VERSION):
            raise ShardError(f"{path}: not a {FORMAT} v{VERSION} manifest; re-run `cllm4rec preprocess`.")
        self._check_manifest(path)

    def _check_manifest(self, path: str) -> None:
        """The manifest's own consistency, and its sizes against id_maps.json (cheap: no shard is read)."""
        def bad(what: str) -> ShardError:
            return ShardError(f"{path}: {what}; the manifest was edited or is damaged. Re-run `cllm4rec preprocess`.")

        m = self.manifest
        for key in ("num_users", "num_items", "vocab_size"):
            if not isinstance(m.get(key), int) or isinstance(m.get(key), bool) or m[key] < 1:
                raise bad(f"{key}={m.get(key)!r} is not a positive whole number")
        if not isinstance(m.get("corpora"), dict) or not isinstance(m.get("files"), dict):
            raise bad("no 'corpora' / 'files' sections")
        for name, entry in m["corpora"].items():
            shards = entry.get("shards") if isinstance(entry, dict) else None
            if not isinstance(shards, list):
                raise bad(f"corpus {name!r} has no shard list")
            for shard in shards:
                ok = (isinstance(shard, dict) and isinstance(shard.get("path"), str)
                      and all(isinstance(shard.get(k), int) and shard[k] >= 0 for k in ("num_docs", "bytes"))
                      and isinstance(shard.get("sha256"), str))
                if not ok:
                    raise bad(f"corpus {name!r}: shard entry {shard!r} lacks path / num_docs / bytes / sha256")
            if entry.get("num_docs") != sum(s["num_docs"] for s in shards):
                raise bad(f"corpus {name!r}: num_docs={entry.get('num_docs')!r} but its shards' num_docs add up to "
                          f"{sum(s['num_docs'] for s in shards)}")
        for name, entry in m["files"].items():
            ok = (isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("bytes"), int)
                  and entry["bytes"] >= 0 and isinstance(entry.get("sha256"), str))
            if not ok:
                raise bad(f"file entry {name!r} ({entry!r}) lacks path / bytes / sha256")
        self._check_fields(bad)
        if "id_maps.json" in m["files"]:
            id_maps = self.read_json("id_maps.json")
            if not isinstance(id_maps, dict):
                raise bad(f"id_maps.json holds a {type(id_maps).__name__}, not an object with users and items")
            for key, size in (("users", "num_users"), ("items", "num_items")):
                if len(id_maps.get(key, [])) != m[size]:
                    raise bad(f"{size}={m[size]} but id_maps.json lists {len(id_maps.get(key, []))} {key}")

    def _check_fields(self, bad) -> None:
        """The manifest fields the trainers, the evaluation and the baselines read, when present (``bad(what)``
        makes the error): ``cold_items`` unique item indices in range, ``protocol`` an object with a known split
        and a positive ``num_negatives``, ``backbone`` an object with a path, ``name`` / ``content_hash`` strings."""
        from cllm4rec_dist.data.protocol import SPLITS

        m = self.manifest

        def whole(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        cold = m.get("cold_items", [])
        if not isinstance(cold, list) or not all(whole(i) for i in cold):
            wrong = cold if not isinstance(cold, list) else next(i for i in cold if not whole(i))
            raise bad(f"cold_items must be a list of item indices (whole numbers), it holds {wrong!r}")
        outside = next((i for i in cold if not 0 <= i < m["num_items"]), None)
        if outside is not None:
            raise bad(f"cold_items holds item {outside}, outside [0, num_items={m['num_items']})")
        if len(set(cold)) != len(cold):
            seen: set[int] = set()
            raise bad(f"cold_items repeats item {next(i for i in cold if i in seen or seen.add(i))}")
        protocol = m.get("protocol", {})
        if not isinstance(protocol, dict):
            raise bad(f"protocol is {protocol!r}, not an object (the protocol settings of `cllm4rec preprocess`)")
        if "split" in protocol and protocol["split"] not in SPLITS:
            raise bad(f"protocol.split is {protocol['split']!r}, not one of {', '.join(SPLITS)}")
        if "num_negatives" in protocol and not (whole(protocol["num_negatives"]) and protocol["num_negatives"] >= 1):
            raise bad(f"protocol.num_negatives is {protocol['num_negatives']!r}, not a whole number >= 1")
        backbone = m.get("backbone", {"path": ""})
        if not isinstance(backbone, dict) or not isinstance(backbone.get("path"), str):
            raise bad(f"backbone is {backbone!r}, not an object with the backbone's path")
        for key in ("name", "content_hash"):
            if key in m and not isinstance(m[key], str):
                raise bad(f"{key} is {m[key]!r}, not a string")

    @property
    def num_users(self) -> int:
        return int(self.manifest["num_users"])

    @property
    def num_items(self) -> int:
        return int(self.manifest["num_items"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def _verified(self, entry: dict) -> bytes:
        path = posixpath.join(self.root, entry["path"])
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise ShardError(f"{path}: listed in the manifest but missing; re-run `cllm4rec preprocess`.") from None
        if len(data) != entry["bytes"] or sha256(data) != entry["sha256"]:
            raise ShardError(f"{path}: {len(data)} bytes, sha256 {sha256(data)[:12]}..., but the manifest records "
                             f"{entry['bytes']} bytes, {entry['sha256'][:12]}...: the file is partial or was changed. "
                             "Re-run `cllm4rec preprocess`.")
        return data

    def shard_urls(self, corpus: str) -> list[str]:
        """Full URLs of a corpus's shards, for any webdataset pipeline (see ``register_fsspec``)."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        return [prefix + posixpath.join(self.root, s["path"]) for s in self.corpus_entry(corpus)["shards"]]

    def corpus_entry(self, corpus: str) -> dict:
        if corpus not in self.manifest["corpora"]:
            raise ShardError(f"{self.url}: no corpus {corpus!r}; it has {sorted(self.manifest['corpora'])}")
        return self.manifest["corpora"][corpus]

    def iter_shard(self, entry: dict):
        """Documents of one shard, in order, after checking its size and checksum (the whole shard's bytes are
        held while they are read: a partial shard is never parsed); then every document's ids against the
        manifest as it is parsed, and the document count at the end (an error names the shard). A driver runs
        ``verify()`` and a training rank reads its partition once at setup, so these errors come before any step.
        """
        source = {"stream": io.BytesIO(self._verified(entry)), "url": entry["path"]}
        where = posixpath.join(self.root, entry["path"])
        count = 0
        for sample in tariterators.group_by_keys(tariterators.tar_file_expander([source])):
            doc = json.loads(sample["json"])
            problem = self._id_problem(doc)
            if problem:
                raise ShardError(f"{where}: document {count}: {problem} (the manifest has num_users={self.num_users}, "
                                 f"num_items={self.num_items}, vocab_size={self.vocab_size}); the manifest or shard "
                                 "belongs to another dataset. Re-run `cllm4rec preprocess`.")
            count += 1
            yield doc
        if count != entry["num_docs"]:
            raise ShardError(f"{where}: holds {count} documents but the manifest records num_docs="
                             f"{entry['num_docs']}; the manifest was edited. Re-run `cllm4rec preprocess`.")

    def iter_part(self, corpus: str, part: ShardPart, skip: int = 0):
        """(partition position, document) of the documents a rank takes from one shard (``part``), from the
        ``skip``-th on. The whole shard is always read to its end, so its count check runs."""
        entry = self.corpus_entry(corpus)["shards"][part.shard]
        for offset, doc in enumerate(self.iter_shard(entry)):
            taken, rest = divmod(offset - part.start, part.step)
            if offset >= part.start and rest == 0 and skip <= taken < part.count:
                yield part.first + taken, doc

    def _id_problem(self, doc) -> str | None:
        """What in a document lies outside the manifest's id ranges, or None."""
        if not isinstance(doc, dict):
            return "not a JSON object"
        users, items = self.num_users, self.num_items
        tokens = self.vocab_size + users + items

        def outside(value, low: int, high: int) -> bool:
            values = value if isinstance(value, list) else [value]
            if values and set(map(type, values)) == {int}:  # the common case, in C (a streaming rank re-reads)
                return min(values) < low or max(values) >= high
            return any(v is not None and (not isinstance(v, int) or not low <= v < high) for v in values)

        if "user" in doc and outside(doc["user"], -1, users):  # -1: an item text (no user)
            return f"user {doc['user']!r} is not in [0, {users})"
        for key in ITEM_FIELDS:
            if key in doc and outside(doc[key], -1 if key == "item" else 0, items):
                return f"{key} holds an item index outside [0, {items})"
        for key in TOKEN_FIELDS:
            if key in doc and outside(doc[key], 0, tokens):
                return f"{key} holds a token id outside [0, {tokens})"
        return None

    def verify(self) -> ShardedDataset:
        """Read every shard once (checksums, document counts, id ranges): for a driver before workers start."""
        for name in self.manifest["corpora"]:
            for shard in self.corpus_entry(name)["shards"]:
                for _ in self.iter_shard(shard):
                    pass
        return self

    def read_corpus(self, corpus: str) -> list[dict]:
        """All documents of a corpus in manifest order (document index = position)."""
        docs = []
        for shard in self.corpus_entry(corpus)["shards"]:
            docs.extend(self.iter_shard(shard))
        if len(docs) != self.corpus_entry(corpus)["num_docs"]:
            raise ShardError(f"{self.url}: corpus {corpus} has {len(docs)} documents, manifest says "
                             f"{self.corpus_entry(corpus)['num_docs']}; re-run `cllm4rec preprocess`.")
        return docs

    def read_json(self, name: str):
        if name not in self.manifest["files"]:
            raise ShardError(f"{self.url}: no {name} in the manifest's files; the dataset is from an older version or "
                             "was edited. Re-run `cllm4rec preprocess`.")
        try:
            return json.loads(self._verified(self.manifest["files"][name]))
        except (ValueError, UnicodeDecodeError) as err:
            raise ShardError(f"{posixpath.join(self.root, name)}: not valid JSON ({err}); re-run "
                             "`cllm4rec preprocess`.") from None

    def eval_split(self) -> EvalSplit:
        docs = self.read_corpus("eval")
        as_array = lambda key: [np.asarray(d[key], dtype=np.int64) for d in docs]  # noqa: E731
        return EvalSplit(self.num_users, self.num_items, as_array("train"), as_array("valid"), as_array("test"),
                         np.asarray(self.manifest.get("cold_items", []), dtype=np.int64))


@dataclass(frozen=True)
class ShardPart:
    """The documents one rank takes from one shard of a corpus: offsets ``start, start + step, ...`` of the
    shard (``count`` of them), which are partition positions ``first, first + 1, ...`` of that rank."""

    shard: int
    """Index of the shard in the corpus's manifest shard list."""
    first: int
    """Partition position of the first document taken."""
    start: int
    """Offset in the shard of the first document taken."""
    step: int
    """Every step-th document from ``start`` (1: the whole shard)."""
    count: int
    """Documents taken."""
    first_global: int
    """Global index (position in the corpus) of the shard's first document."""


def partition_parts(entry: dict, rank: int, world: int) -> list[ShardPart]:
    """What rank ``rank`` of ``world`` reads of a corpus (its manifest entry), in partition order.

    Rank r takes shards r, r+W, r+2W, ...; with fewer shards than ranks, every W-th document (global index
    ≡ r mod W) of every shard. One rule for every corpus, so all ranks agree on every partition from the
    manifest alone.
    """
    shards = entry["shards"]
    offsets = np.cumsum([0] + [s["num_docs"] for s in shards]).tolist()
    few = len(shards) < world
    parts, first = [], 0
    for k in (range(len(shards)) if few else range(rank, len(shards), world)):
        start, step = ((rank - offsets[k]) % world, world) if few else (0, 1)
        count = len(range(start, shards[k]["num_docs"], step))
        if count:
            parts.append(ShardPart(k, first, start, step, count, offsets[k]))
            first += count
    return parts


def partition_doc_ids(entry: dict, rank: int, world: int) -> np.ndarray:
    """Global indices of the documents rank ``rank`` of ``world`` reads, in partition order (``partition_parts``)."""
    ids = [np.arange(p.first_global + p.start, p.first_global + p.start + p.count * p.step, p.step, dtype=np.int64)
           for p in partition_parts(entry, rank, world)]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)


def load_eval_split(data_dir: str) -> EvalSplit:
    """The train/valid/test lists of a preprocessed dataset (what every model is scored on)."""
    return ShardedDataset(data_dir).eval_split()


def register_fsspec() -> None:
    """Let ``webdataset.WebDataset`` open any fsspec URL (memory://, s3://, gs://, ...).

    webdataset's own opener knows only local files, pipes and a few schemes
    (see shared notes); this routes every fsspec protocol through fsspec.
    """
    import sys

    gopen = sys.modules["webdataset.gopen"]

    def fsspec_gopen(url, mode="rb", bufsize=8192, **kw):
        return fsspec.open(url, mode).open()

    for protocol in fsspec.available_protocols():
        if protocol not in ("file", "pipe"):
            gopen.gopen_schemes.setdefault(protocol, fsspec_gopen)
