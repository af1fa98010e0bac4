"""A detector card's pipeline parameters: what the card allows and what it refuses."""

from __future__ import annotations

import dataclasses

import pytest

from medssl.models import load_card
from medssl.pipeline.detect import DetectionParams
from medssl.pipeline.preprocess import Intensity, PercentileIntensity
from tests.paths import DETECTOR_DIR


def test_the_shipped_detector_card_gives_an_hu_window_and_a_cubic_window():
    params = load_card(DETECTOR_DIR).detection_params()
    assert isinstance(params.normalisation, Intensity)
    assert len(params.window) == 3 and len(set(params.window)) == 1


def test_a_detector_card_without_an_hu_window_is_refused_with_the_kind_it_has():
    card = dataclasses.replace(load_card(DETECTOR_DIR), normalisation=PercentileIntensity())
    with pytest.raises(ValueError, match=r"HU-window normalisation .*'percentile'"):
        card.detection_params()


@pytest.mark.parametrize("window", [32, [32, 32, 32], (32, 32, 32)])
def test_a_window_given_as_one_number_or_a_list_becomes_a_zyx_triple(window):
    assert DetectionParams(window=window, divisor=16).window == (32, 32, 32)
