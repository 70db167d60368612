"""The session fixtures: digits shards on local disk and on the Ceph RGW."""

import hashlib
import os

import numpy as np
import pytest
from sklearn.datasets import load_digits

from ddn_dist.data.index import load_index


def test_digits_shards_index_counts(digits_shards):
    index = load_index(digits_shards)
    assert index.dataset.num_samples == 1797
    assert [s.num_samples for s in index.shards] == [200] * 8 + [197]
    assert index.dataset.resolution == 8
    assert index.dataset.channels == 1
    assert index.dataset.num_classes == 10
    expected_mean = np.rint(load_digits().images * 255 / 16).mean() / 255
    assert index.dataset.mean[0] == pytest.approx(expected_mean, rel=1e-12)


@pytest.mark.ceph
def test_digits_s3_shards_match_local(s3_env, digits_s3_shards, digits_shards):
    s3_index = load_index(digits_s3_shards)
    local_index = load_index(digits_shards)
    assert s3_index.to_json() == local_index.to_json()
    fs = s3_env.filesystem()
    first = s3_index.shards[0]
    remote = fs.cat_file(f"{digits_s3_shards[len('s3://') :]}/{first.url}")
    with open(os.path.join(digits_shards, first.url), "rb") as f:
        assert remote == f.read()
    assert hashlib.sha256(remote).hexdigest() == first.sha256
