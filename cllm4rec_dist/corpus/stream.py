"""One rank's partition of a corpus, read from its shards as a stream with a bounded shuffle buffer.

The order of an epoch (one algorithm; the buffer size only bounds memory):

1. the partition's shards are read in a seeded order drawn per epoch;
2. their documents, in that order, enter a buffer of ``capacity`` documents; once it is full, each arriving
   document takes the slot of a uniformly drawn resident one, which is emitted;
3. when the partition is read, the documents still resident are emitted in a seeded permutation of their
   partition order.

When the buffer holds the whole partition (``capacity >= size``, the in-memory case), step 2 never emits and
step 3 permutes the whole partition with the same generator the in-memory reader always used: buffer = ∞ is
that full shuffle, batch for batch. With a smaller buffer a document can only leave a window of about
``capacity`` documents around its shard's turn: shards are mixed globally (step 1), documents only locally
(step 2). Documents stored next to each other (a user's reviews) therefore share batches more often than under
a full shuffle; a buffer of several shards' worth of documents (``ShardPlan.max_docs_per_shard``) keeps that small.

Every decision depends only on the manifest's counts and the seed, never on document contents or on when a
read finishes, so the emission order is a pure function of (seed, corpus, epoch, stream) and can be replayed on
positions alone (``EpochOrder``, no shard read). ``PartitionReader.seek(epoch, k)`` replays it to k, reads only
the shards holding the documents then resident, and continues with the shard being read at k: that is how a
resumed run, or any out-of-order ``take``, lands exactly where an uninterrupted run would be.

Memory: at most ``capacity`` documents resident (``PartitionReader.high_water`` records the most there ever
were) plus the batch being handed out and the raw bytes of the one shard being read (whole, because its
sha256 is checked before a document of it is parsed).
"""

from __future__ import annotations

import bisect
import hashlib

import numpy as np

from cllm4rec_dist.corpus.shards import ShardError, ShardPart, partition_parts

# Generator streams (the last seed word; recommenders/cllm4rec/batches.py uses 1 and 2 per document): the document
# order is 3, as before streaming, so a buffer covering the partition reproduces that order; the per-epoch shard order
# is 4.
_DOC_ORDER = 3
_SHARD_ORDER = 4


class EpochOrder:
    """The emission order of one pass over a partition, on positions only: ``next()`` gives the next position.

    After each ``next()``, ``resident()`` is the buffer (positions read and not yet emitted) and ``admitted``
    the number of documents read, in ``read_order``; the reader uses both to resume a pass mid-way.
    """

    def __init__(self, parts: list[ShardPart], capacity: int, key: list[int]):
        self.size = sum(p.count for p in parts)
        self.capacity = capacity
        if capacity >= self.size:  # one permutation of the whole partition: the shard order cannot matter
            self.read_order = list(parts)
        else:
            shard_rng = np.random.default_rng([*key, _SHARD_ORDER])
            self.read_order = [parts[k] for k in shard_rng.permutation(len(parts))]
        self.rng = np.random.default_rng([*key, _DOC_ORDER])
        self.admitted = 0
        self.emitted = 0
        self._buffer: list[int] = []
        self._part = 0          # index in read_order of the shard being read
        self._offset = 0        # documents of it read
        self._draws: list[int] = []  # buffer slots replaced by its remaining documents
        self._drain: list[int] | None = None

    def next(self) -> int:
        while self._drain is None:
            if self._part == len(self.read_order):
                rest = sorted(self._buffer)
                self._drain = [rest[k] for k in self.rng.permutation(len(rest))][::-1]  # popped from the end
                self._buffer = []
                break
            part = self.read_order[self._part]
            if self._offset == 0:  # entering a shard: draw the slots its overflow documents replace
                overflow = part.count - min(part.count, self.capacity - len(self._buffer))
                self._draws = self.rng.integers(self.capacity, size=overflow).tolist()[::-1] if overflow else []
            if self._offset == part.count:
                self._part, self._offset = self._part + 1, 0
                continue
            position = part.first + self._offset
            if len(self._buffer) < self.capacity:  # filling: read as many as fit, emit nothing
                fill = min(part.count - self._offset, self.capacity - len(self._buffer))
                self._buffer.extend(range(position, position + fill))
                self._offset += fill
                self.admitted += fill
                continue
            slot = self._draws.pop()
            out, self._buffer[slot] = self._buffer[slot], position
            self._offset += 1
            self.admitted += 1
            self.emitted += 1
            return out
        if not self._drain:
            raise StopIteration("the pass is over")
        self.emitted += 1
        return self._drain.pop()

    def resident(self) -> list[int]:
        """Positions read and not yet emitted (what the buffer holds now)."""
        return list(self._buffer) if self._drain is None else list(self._drain)

    def read_cursor(self) -> tuple[int, int]:
        """(index in read_order, documents of that shard already read) of the next document to read."""
        index, before = 0, self.admitted
        while index < len(self.read_order) and before >= self.read_order[index].count:
            before -= self.read_order[index].count
            index += 1
        return index, before


class PartitionReader:
    """Documents of one rank's partition of a corpus, streamed from its shards in ``EpochOrder``.

    ``take(epoch, start, count)`` returns the (position, document) pairs at emission indices
    ``start .. start+count-1`` of epoch ``epoch``; an index past the partition's size wraps around to the same
    epoch's order again (a rank with a smaller partition repeats documents rather than running out early).
    Sequential takes continue the live stream; any other take seeks first.
    """

    def __init__(self, data, corpus: str, rank: int, world: int, buffer_docs: int, key: list[int]):
        self.data, self.corpus, self.key = data, corpus, list(key)
        self.rank, self.world, self.buffer_docs = rank, world, buffer_docs
        self.parts = partition_parts(data.corpus_entry(corpus), rank, world)
        self.size = sum(p.count for p in self.parts)
        self.capacity = self.size if buffer_docs == 0 else min(buffer_docs, self.size)
        self.keeps_all = self.capacity >= self.size  # the in-memory case: read once, kept across epochs
        self.docs: dict[int, dict] = {}  # resident documents by partition position
        self.high_water = 0              # the most documents ever resident at once
        self.shard_reads = 0             # shards read (each one: bytes, sha256, parse)
        self._order: EpochOrder | None = None
        self._reads = iter(())           # (position, doc) still to read in the live pass
        self._epoch, self._index = None, None  # emission index in the epoch that the live stream gives next
        self._last: tuple | None = None

    # ---- reading shards --------------------------------------------------------------------------

    def _read(self, part: ShardPart, skip: int = 0):
        self.shard_reads += 1
        yield from self.data.iter_part(self.corpus, part, skip)

    def _hold(self, position: int, doc: dict) -> None:
        self.docs[position] = doc
        self.high_water = max(self.high_water, len(self.docs))

    def verify(self) -> PartitionReader:
        """Read the whole partition once (sha256, counts, ids: errors before any step). The in-memory case
        keeps what it read; a streaming reader keeps nothing."""
        for part in self.parts:
            for position, doc in self._read(part):
                if self.keeps_all:
                    self._hold(position, doc)
        return self

    def documents(self):
        """Every (position, document) of the partition in partition (manifest) order, streamed."""
        for part in self.parts:
            yield from self._read(part)

    def global_indices(self, positions: np.ndarray) -> np.ndarray:
        """Global document indices (positions in the corpus) of partition positions."""
        firsts = np.array([p.first for p in self.parts], dtype=np.int64)
        k = np.searchsorted(firsts, positions, side="right") - 1
        start = np.array([p.first_global + p.start for p in self.parts], dtype=np.int64)[k]
        step = np.array([p.step for p in self.parts], dtype=np.int64)[k]
        return (start + (positions - firsts[k]) * step).astype(np.int64)

    # ---- the stream ----------------------------------------------------------------------------------

    def take(self, epoch: int, start: int, count: int) -> list[tuple[int, dict]]:
        if self._last is not None and self._last[0] == (epoch, start, count):
            return self._last[1]
        if (epoch, start) != (self._epoch, self._index):
            self.seek(epoch, start)
        out = []
        for _ in range(count):
            if self._index % self.size == 0:  # a pass begins (a smaller partition wraps around)
                self._start_pass(epoch)
            position = self._order.next()
            out.append((position, self._emit(position)))
            self._index += 1
        self._last = ((epoch, start, count), out)
        return out

    def _start_pass(self, epoch: int) -> None:
        self._order = self._replay(epoch, 0)
        if not self.keeps_all:
            self.docs = {}
            self._reads = (pair for part in self._order.read_order for pair in self._read(part))

    def _emit(self, position: int) -> dict:
        if self.keeps_all:
            if len(self.docs) < self.size:
                self.verify()
            return self.docs[position]
        while position not in self.docs:  # it was admitted earlier: read up to it
            try:
                self._hold(*next(self._reads))
            except StopIteration:
                raise ShardError(f"{self.data.url}: corpus {self.corpus}: the shards ended before partition "
                                 f"position {position}; re-run `cllm4rec preprocess`.") from None
        return self.docs.pop(position)

    def _replay(self, epoch: int, index: int) -> EpochOrder:
        """The epoch's order after ``index`` emissions (``index`` < size), replayed without reading a shard."""
        order = EpochOrder(self.parts, self.capacity, [*self.key[:2], epoch, *self.key[2:]])
        for _ in range(index):
            order.next()
        return order

    def seek(self, epoch: int, index: int) -> None:
        """Make emission ``index`` of ``epoch`` the next one: replay the order to it, read the documents then
        resident from their shards, and continue reading where the pass was."""
        self._epoch, self._index, self._last = epoch, index, None
        within = index % self.size
        if within == 0:  # at a pass boundary: the next take starts a fresh pass
            self._order = None
            return
        order = self._order = self._replay(epoch, within)
        if self.keeps_all:
            return
        resident = sorted(order.resident())
        self.docs = {}
        firsts = [p.first for p in self.parts]
        by_part: dict[int, list[int]] = {}
        for position in resident:
            by_part.setdefault(bisect.bisect_right(firsts, position) - 1, []).append(position)
        for k, positions in by_part.items():
            wanted = set(positions)
            for position, doc in self._read(self.parts[k]):
                if position in wanted:
                    self._hold(position, doc)
        part_index, offset = order.read_cursor()
        rest = order.read_order[part_index:]
        self._reads = (pair for n, part in enumerate(rest) for pair in self._read(part, offset if n == 0 else 0))

    # ---- resume state --------------------------------------------------------------------------------

    def identity(self) -> dict:
        """What fixes the order: a resume state applies only to a reader with the same identity."""
        shards = self.data.corpus_entry(self.corpus)["shards"]
        digest = hashlib.sha256("".join(shards[p.shard]["sha256"] for p in self.parts).encode()).hexdigest()
        return {"corpus": self.corpus, "rank": self.rank, "world": self.world, "buffer_docs": self.buffer_docs,
                "key": list(self.key), "shards_sha256": digest}

    def state(self, epoch: int, index: int) -> dict:
        """The stream's position before emission ``index`` of ``epoch``: the buffer's content (as a digest of
        the resident positions) and how far the shards were read. Plain data, for a checkpoint."""
        within = index % self.size
        if self._order is not None and (epoch, index) == (self._epoch, self._index) and within:
            order = self._order
        else:
            order = self._replay(epoch, within)
        resident = np.asarray(sorted(order.resident()), dtype=np.int64)
        return {**self.identity(), "epoch": epoch, "index": index, "admitted": order.admitted if within else 0,
                "resident": len(resident), "resident_sha256": hashlib.sha256(resident.tobytes()).hexdigest()}
