"""The output location of a prep job: ownership, part manifests and the final index.

`_prep/job.json` records the fingerprint of the data set being prepared at a location, so a rerun
of the same job resumes there and a different job is rejected. Each part writes
`_prep/part-<I>-of-<N>.json` once all of its shards are written. `merge_index` joins a complete
set of part manifests into `index.json`, which is written last and atomically, so a reader that
finds the index can trust every shard it lists.
"""

from __future__ import annotations

import json
import logging
import os

from ddn_dist import storage
from ddn_dist.data import index as index_mod
from ddn_dist.data.prep import writer

log = logging.getLogger(__name__)

PREP_DIR = "_prep"
JOB_FILE = "job.json"
# A 64-rank job with 8 loader workers per rank needs 512 shards for every worker to own at least
# one. The hint is given for data sets of at least LARGE_DATASET_IMAGES images.
HINT_RANKS = 64
HINT_WORKERS_PER_RANK = 8
LARGE_DATASET_IMAGES = 50_000


class PrepError(ValueError):
    """Data prep cannot go on: bad options, an occupied output location or a bad image."""


def read_json(url: str, endpoint_url: str | None) -> dict | None:
    try:
        return json.loads(storage.read_bytes(url, endpoint_url))
    except FileNotFoundError:
        return None


def write_json(url: str, payload: dict, endpoint_url: str | None) -> None:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":")) + "\n"
    storage.write_bytes_atomic(url, text.encode(), endpoint_url)


def _remove_dataset(out: str, endpoint_url: str | None) -> None:
    """Delete a previous data set prepared at `out`: its index first, then manifests and shards."""
    fs, root = storage.get_fs(out, endpoint_url)
    fs.invalidate_cache()
    index_path = storage.join_url(root, index_mod.INDEX_NAME)
    if fs.exists(index_path):
        fs.rm(index_path)
    for path in fs.glob(storage.join_url(root, f"{PREP_DIR}/*")) + fs.glob(
        storage.join_url(root, "shard-*.tar")
    ):
        fs.rm(path)
    log.info("removed the previous data set at %s (--overwrite)", out)


def check_bucket(url: str, endpoint_url: str | None) -> None:
    """Raise PrepError when the bucket of an s3:// URL is missing, forbidden or unreachable."""
    if not url.startswith("s3://"):
        return
    fs, path = storage.get_fs(url, endpoint_url)
    bucket = path.split("/", 1)[0]
    where = endpoint_url or storage.endpoint_from_env() or "AWS S3"
    try:
        storage.RetryPolicy(attempts=3).call(lambda: fs.info(bucket), f"lookup of bucket {bucket}")
    except FileNotFoundError as error:
        raise PrepError(
            f"S3 bucket {bucket} not found at {where}; create it first (`aws s3 mb s3://{bucket}`) "
            f"or check --endpoint-url"
        ) from error
    except PermissionError as error:
        raise PrepError(
            f"access denied to S3 bucket {bucket} at {where}; check AWS_ACCESS_KEY_ID, "
            f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and --endpoint-url"
        ) from error
    except Exception as error:
        if not storage.is_transient(error):
            raise
        raise PrepError(f"cannot reach S3 bucket {bucket} at {where}: {error}") from error


def claim_output(
    out: str, endpoint_url: str | None, digest: str, overwrite: bool, num_parts: int
) -> None:
    """Record the job (by its fingerprint digest) at `out`.

    Raise PrepError when `out` contains a different data set, unless `overwrite` is set.
    """
    check_bucket(out, endpoint_url)
    job_url = storage.join_url(out, f"{PREP_DIR}/{JOB_FILE}")
    index_url = index_mod.index_url_for(out)
    job = read_json(job_url, endpoint_url)
    existing_index = read_json(index_url, endpoint_url)
    index_digest = None
    if existing_index is not None:
        index_digest = (
            existing_index.get("dataset", {}).get("options", {}).get("fingerprint", "<none>")
        )
    other = (job is not None and job.get("fingerprint") != digest) or (
        index_digest is not None and index_digest != digest
    )
    if other and not overwrite:
        raise PrepError(
            f"{out} already contains a different data set (prepared from other input or "
            f"options); choose another --out or pass --overwrite to replace it"
        )
    if other and num_parts == 1:
        _remove_dataset(out, endpoint_url)
    elif other and existing_index is not None:
        # Parts run concurrently, so each removes only the old index; old shards get replaced.
        fs, index_path = storage.get_fs(index_url, endpoint_url)
        fs.rm(index_path)
    write_json(job_url, {"fingerprint": digest}, endpoint_url)


def manifest_url(out: str, part: int, num_parts: int) -> str:
    return storage.join_url(out, f"{PREP_DIR}/part-{part:05d}-of-{num_parts:05d}.json")


def hint_shard_count(num_images: int, num_shards: int) -> None:
    """Log a warning when a large data set has too few shards for a 64-rank job."""
    needed = HINT_RANKS * HINT_WORKERS_PER_RANK
    if num_images >= LARGE_DATASET_IMAGES and num_shards < needed:
        log.warning(
            "%d images in %d shards: a %d-rank job with %d loader workers per rank needs at least "
            "%d shards so that every worker streams its own; pass --shard-samples %d or less",
            num_images,
            num_shards,
            HINT_RANKS,
            HINT_WORKERS_PER_RANK,
            needed,
            max(1, num_images // needed),
        )


def merge_index(out: str, endpoint_url: str | None = None) -> str:
    """Join the part manifests of the job recorded at `out` into index.json; return its URL.

    Raise PrepError naming the missing parts when no complete set of manifests exists.
    """
    storage.require_credentials(out)
    job = read_json(storage.join_url(out, f"{PREP_DIR}/{JOB_FILE}"), endpoint_url)
    if job is None:
        raise PrepError(
            f"no prep job found at {out} ({PREP_DIR}/{JOB_FILE} is missing); run `ddn prep` first"
        )
    digest = job["fingerprint"]
    fs, root = storage.get_fs(out, endpoint_url)
    fs.invalidate_cache()
    names = sorted(
        os.path.basename(p) for p in fs.glob(storage.join_url(root, f"{PREP_DIR}/part-*-of-*.json"))
    )
    by_parts: dict[int, dict[int, str]] = {}
    for name in names:
        stem = name[len("part-") : -len(".json")]
        part_text, _, total_text = stem.partition("-of-")
        if part_text.isdigit() and total_text.isdigit():
            by_parts.setdefault(int(total_text), {})[int(part_text)] = name
    manifests = None
    for num_parts in sorted(by_parts):
        if len(by_parts[num_parts]) == num_parts:
            loaded = [
                read_json(
                    storage.join_url(out, f"{PREP_DIR}/{by_parts[num_parts][i]}"), endpoint_url
                )
                for i in range(num_parts)
            ]
            if all(m is not None and m["fingerprint"] == digest for m in loaded):
                manifests = loaded
                break
    if manifests is None:
        if not by_parts:
            raise PrepError(
                f"no part manifests under {storage.join_url(out, PREP_DIR)}; "
                f"run the prep parts first"
            )
        num_parts = max(by_parts, key=lambda n: len(by_parts[n]))
        missing = sorted(set(range(num_parts)) - set(by_parts[num_parts]))
        raise PrepError(
            f"{out}: parts {', '.join(f'{i}/{num_parts}' for i in missing) or '(none)'} have no "
            f"manifest for the current job; rerun `ddn prep ... --part I/{num_parts}` for them"
        )
    first = manifests[0]["dataset"]
    stats = writer.PixelStats(first["channels"])
    shards = []
    bad_images = 0
    for manifest in manifests:
        stats.merge(writer.PixelStats.from_dict(manifest["stats"]))
        bad_images += len(manifest["bad_images"])
        for raw in manifest["shards"]:
            samples = [index_mod.SampleEntry(**s) for s in raw["samples"]]
            shards.append(index_mod.ShardEntry(**{**raw, "samples": samples}))
    mean, std = stats.mean_std()
    options = {**first["options"], "fingerprint": digest, "bad_images_skipped": bad_images}
    info = index_mod.DatasetInfo(
        name=first["name"],
        resolution=first["resolution"],
        channels=first["channels"],
        num_samples=sum(s.num_samples for s in shards),
        has_labels=first["has_labels"],
        num_classes=first["num_classes"],
        mean=mean,
        std=std,
        options=options,
    )
    hint_shard_count(info.num_samples, len(shards))
    url = index_mod.save_index(out, index_mod.ShardIndex(dataset=info, shards=shards), endpoint_url)
    log.info("wrote index %s: %d samples in %d shards", url, info.num_samples, len(shards))
    return url
