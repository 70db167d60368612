"""The shard index: what a data set of WebDataset tar shards contains, written next to the shards.

`index.json` is written last and atomically by data prep, so a reader that finds it can trust every
shard it lists. Shard URLs inside the index are relative to the index's directory, so a data set can
be copied between stores (local disk, S3) without rewriting it.

Layout of one sample inside a shard: tar members `<key>.png` (lossless PNG, mode L or RGB) and, when
the data set has labels, `<key>.cls` (the class as decimal text). `offset` is the byte offset of the
sample's first tar header and `length` covers all of its members (headers, data and padding), so
the bytes [offset, offset + length) are a valid tar stream on their own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from ddn_dist import storage

INDEX_FORMAT = "ddn-shard-index"
INDEX_VERSION = 1
INDEX_NAME = "index.json"


class IndexError_(ValueError):
    """The shard index is missing, malformed or inconsistent with the shards."""


@dataclass
class SampleEntry:
    """One sample: its key and the byte range of its tar members inside the shard."""

    key: str
    offset: int
    length: int


@dataclass
class ShardEntry:
    """One tar shard: its URL relative to the index, size, checksum and samples in file order."""

    url: str
    num_samples: int
    num_bytes: int
    sha256: str
    samples: list[SampleEntry] = field(default_factory=list)


@dataclass
class DatasetInfo:
    """Facts about the data set as a whole; mean and std are per channel, over pixels in [0, 1]."""

    name: str
    resolution: int
    channels: int
    num_samples: int
    has_labels: bool
    num_classes: int
    mean: list[float]
    std: list[float]
    options: dict = field(default_factory=dict)


@dataclass
class ShardIndex:
    """The whole index: format tag and version, data set facts, and the shards in order."""

    dataset: DatasetInfo
    shards: list[ShardEntry]
    format: str = INDEX_FORMAT
    version: int = INDEX_VERSION

    def to_json(self) -> str:
        """Serialise deterministically (sorted keys, fixed separators) so reruns are byte-identical."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "<index>") -> "ShardIndex":
        """Parse and validate an index; raise IndexError_ naming `where` on any inconsistency."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise IndexError_(f"shard index {where} is not valid JSON ({error}); rerun data prep") from error
        if not isinstance(raw, dict):
            raise IndexError_(
                f"{where} is not a ddn shard index (a JSON {type(raw).__name__}, not an object)")
        if raw.get("format") != INDEX_FORMAT:
            raise IndexError_(f"{where} is not a ddn shard index (format={raw.get('format')!r})")
        if raw.get("version") != INDEX_VERSION:
            raise IndexError_(
                f"shard index {where} has version {raw.get('version')}, this ddn-dist reads version "
                f"{INDEX_VERSION}; rerun data prep with this version"
            )
        try:
            shards = [
                ShardEntry(**{**s, "samples": [SampleEntry(**e) for e in s["samples"]]}) for s in raw["shards"]
            ]
            index = cls(dataset=DatasetInfo(**raw["dataset"]), shards=shards)
        except (KeyError, TypeError) as error:  # a missing, unexpected or mistyped field
            raise IndexError_(
                f"shard index {where} is malformed ({error!r}); rerun data prep") from error
        index.validate(where)
        return index

    def validate(self, where: str = "<index>") -> None:
        """Check the counts add up; raise IndexError_ naming the first bad shard."""
        total = 0
        for shard in self.shards:
            if shard.num_samples != len(shard.samples):
                raise IndexError_(
                    f"shard {shard.url} in {where} declares {shard.num_samples} samples but lists "
                    f"{len(shard.samples)}; rerun data prep"
                )
            total += shard.num_samples
        if total != self.dataset.num_samples:
            raise IndexError_(
                f"{where} lists {total} samples in its shards but the data set declares "
                f"{self.dataset.num_samples}; rerun data prep"
            )

    @property
    def num_samples(self) -> int:
        return self.dataset.num_samples


def index_url_for(location: str) -> str:
    """Return the index URL for a data set location (a directory URL or the index URL itself)."""
    return location if location.endswith(".json") else storage.join_url(location, INDEX_NAME)


def shard_url(index_url: str, shard: ShardEntry) -> str:
    """Return the absolute URL of a shard listed in the index at `index_url`."""
    if "://" in shard.url or shard.url.startswith("/"):
        return shard.url
    return storage.join_url(storage.dirname_url(index_url), shard.url)


def load_index(location: str, endpoint_url: str | None = None) -> ShardIndex:
    """Read and validate the index of the data set at `location`."""
    url = index_url_for(location)
    try:
        text = storage.read_bytes(url, endpoint_url).decode()
    except FileNotFoundError as error:
        raise IndexError_(
            f"no shard index at {url}: the data set is missing or its preparation did not finish; "
            f"run `ddn prep ... --out {storage.dirname_url(url) if url.endswith('.json') else location}`"
        ) from error
    except UnicodeDecodeError as error:
        raise IndexError_(f"shard index {url} is not UTF-8 text ({error}); rerun data prep") from error
    return ShardIndex.from_json(text, url)


def save_index(location: str, index: ShardIndex, endpoint_url: str | None = None) -> str:
    """Write the index atomically next to the shards and return its URL."""
    index.validate()
    url = index_url_for(location)
    storage.write_bytes_atomic(url, index.to_json().encode(), endpoint_url)
    return url
