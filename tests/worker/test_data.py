"""worker.data's cache of generated datasets: the same arrays as generating them, a copy for
each job (no job can change another's data), bounded by bytes, keyed by the whole ref."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from convoy import datasets
from convoy.settings import Settings
from worker.data import GENERATED, load_split


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    GENERATED.clear()
    yield
    GENERATED.clear()


def ref(**fields: object) -> datasets.SyntheticRef:
    return datasets.SyntheticRef.model_validate({"name": "synthetic", "samples": 40, **fields})


def arrays(split: datasets.Split) -> list[np.ndarray]:
    return [split.x_train, split.y_train, split.x_val, split.y_val]


def settings(cache_bytes: int) -> Settings:
    return Settings(dataset_cache_bytes=cache_bytes)


def test_a_kept_dataset_equals_a_generated_one_and_each_job_gets_its_own_copy():
    fresh = datasets.load_synthetic(ref())
    first = load_split(ref(), settings=settings(10**8), tenant="t")
    for a in arrays(first):  # what a job might do to its arrays
        assert a.flags.writeable
        a[...] = 7
    second = load_split(ref(), settings=settings(10**8), tenant="t")
    assert len(GENERATED.kept()) == 1
    for got, want in zip(arrays(second), arrays(fresh), strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype


def test_refs_differing_in_any_field_or_only_by_defaults_spelled_out():
    load_split(ref(), settings=settings(10**8), tenant="t")
    load_split(ref(num_classes=4, seed=0), settings=settings(10**8), tenant="t")  # the same
    seeded = load_split(ref(seed=1), settings=settings(10**8), tenant="t")
    assert len(GENERATED.kept()) == 2
    np.testing.assert_array_equal(seeded.x_train, datasets.load_synthetic(ref(seed=1)).x_train)


def test_the_cache_keeps_the_most_recently_used_within_its_bytes():
    one = sum(a.nbytes for a in arrays(datasets.load_synthetic(ref())))
    for seed in (1, 2, 1, 3):  # 1 is used again before 3 arrives: 2 is the one dropped
        load_split(ref(seed=seed), settings=settings(2 * one), tenant="t")
    assert [datasets.SyntheticRef.model_validate_json(k).seed for k in GENERATED.kept()] == [1, 3]
    load_split(ref(seed=4), settings=settings(0), tenant="t")  # 0 keeps nothing new
    assert len(GENERATED.kept()) <= 2
    assert all(datasets.SyntheticRef.model_validate_json(k).seed != 4 for k in GENERATED.kept())
