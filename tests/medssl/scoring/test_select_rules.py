"""Selection rules as data: a card's ``selection`` is written by ``rules_to_mapping`` and read
by ``rules_from_mapping``; ``--select`` replaces a base key by key."""

from __future__ import annotations

import dataclasses
import json

import pytest

from medssl.errors import ConfigError
from medssl.models.card import ModelCard, load_card
from medssl.scoring.select import (
    SelectionRules,
    parse_rules,
    rules_from_mapping,
    rules_to_mapping,
)
from tests.paths import MODEL_REPOSITORY


def test_rules_round_trip_through_their_mapping_holding_only_what_differs() -> None:
    rules = SelectionRules(min_slices=16, max_thickness_mm=5.0, body_part=("ABDOMEN",))
    data = rules_to_mapping(rules)
    assert data == {"min_slices": 16, "max_thickness_mm": 5.0, "body_part": ["ABDOMEN"]}
    assert rules_from_mapping(json.loads(json.dumps(data))) == rules
    assert rules_to_mapping(SelectionRules()) == {}


def test_select_replaces_the_base_key_by_key() -> None:
    base = SelectionRules(max_thickness_mm=5.0, min_slices=16)
    assert parse_rules(None, base) is base
    assert parse_rules("min_slices=8", base) == SelectionRules(max_thickness_mm=5.0, min_slices=8)
    assert parse_rules("min_slices=8") == SelectionRules(min_slices=8)


def test_a_card_carries_its_selection_and_refuses_a_bad_one() -> None:
    card = load_card(MODEL_REPOSITORY / "focalmix-nodules" / "1" / "medssl.json")
    assert card.selection_rules() == SelectionRules()  # written before cards had one
    thick = dataclasses.replace(card, selection={"max_thickness_mm": 5.0})
    assert ModelCard.from_json(thick.to_json()) == thick
    assert thick.selection_rules().max_thickness_mm == 5.0
    with pytest.raises(ValueError, match="selection: unknown selection rule"):
        dataclasses.replace(card, selection={"thickness": 5})
    with pytest.raises(ValueError, match="selection: selection rule min_slices: bad value"):
        dataclasses.replace(card, selection={"min_slices": "many"})
    with pytest.raises(ConfigError):
        rules_from_mapping({"min_slices": "many"})
