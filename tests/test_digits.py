"""The built-in digits read straight from scikit-learn's CSV (convoy.datasets.digits_arrays):
the same arrays as its load_digits(), without the cost of importing scikit-learn."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from convoy.datasets import DIGITS_SAMPLES, digits_arrays


def test_digits_are_exactly_scikit_learns():
    from sklearn.datasets import load_digits

    images, target = digits_arrays()
    reference = load_digits()
    assert images.shape == (DIGITS_SAMPLES, 8, 8)
    assert images.dtype == reference.images.dtype
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(target, reference.target)


def test_loading_digits_does_not_import_scikit_learn():
    code = ("import sys; from convoy.datasets import load_digits; s = load_digits(); "
            "print(len(s.y_train) + len(s.y_val), 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [str(DIGITS_SAMPLES), "False"]
