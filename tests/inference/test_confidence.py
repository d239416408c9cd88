"""The confidence baseline (DeepConf-style, inference/confidence.py): a trace's confidence is its
lowest sliding-window mean, and the filter's threshold is a percentile of a group's."""

from __future__ import annotations

import pytest

from stepprobe.inference.confidence import ConfidenceFilter, trace_confidence


def test_trace_confidence_is_lowest_window_mean():
    assert trace_confidence([1, 1, 5, 5, 1], 2) == pytest.approx(1.0)
    assert trace_confidence([4, 2], 8) == pytest.approx(3.0)
    assert trace_confidence(None, 4) is None

    class T:
        def __init__(self, c):
            self.confidence = c

    f = ConfidenceFilter(window=2, percentile=50.0)
    assert f.thresholds([[T([1, 1]), T([3, 3]), T([5, 5])]]) == [pytest.approx(3.0)]
