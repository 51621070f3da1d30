"""The objective registry: every built-in name resolves, declares its roles and batch kind, and an
unknown name is a ConfigError that suggests the closest name."""
from __future__ import annotations

import dataclasses

import pytest

from prefopt.errors import ConfigError
from prefopt.objectives import OBJECTIVES, Objective, ObjectiveParams, get_objective

EXPECTED = {   # name: (needs, batch_kind, accuracy_metric)
    "dpo": ({"reference"}, "pairs", "rewards/accuracy"),
    "ipo": ({"reference"}, "pairs", "rewards/accuracy"),
    "simpo": (set(), "pairs", "rewards/accuracy"),
    "lipo": ({"reference"}, "lists", "ranking/accuracy"),
    "listmle": ({"reference"}, "lists", "ranking/accuracy"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_lookup_and_declarations(name):
    cls = get_objective(name)
    assert cls is OBJECTIVES.get(name) and name in OBJECTIVES
    assert issubclass(cls, Objective) and cls.name == name
    needs, batch_kind, accuracy_metric = EXPECTED[name]
    assert isinstance(cls.needs, frozenset) and cls.needs == needs
    assert cls.batch_kind == batch_kind
    assert cls.accuracy_metric == accuracy_metric
    # Params: a dataclass subclass of ObjectiveParams whose default name is the objective's.
    assert dataclasses.is_dataclass(cls.Params) and issubclass(cls.Params, ObjectiveParams)
    params = cls.Params()
    assert params.name == name and params.beta > 0
    assert cls(params).params is params


def test_all_builtins_registered():
    assert set(EXPECTED) <= set(OBJECTIVES.names())


@pytest.mark.parametrize("typo,suggestion", [("dpoo", "dpo"), ("simpoo", "simpo"),
                                             ("list_mle", "listmle"), ("lipo-lambda", "lipo")])
def test_unknown_name_suggests_closest(typo, suggestion):
    with pytest.raises(ConfigError) as err:
        get_objective(typo)
    message = str(err.value)
    assert f"did you mean '{suggestion}'" in message
    assert f"'{typo}'" in message and "available:" in message


def test_unrelated_name_has_no_suggestion():
    with pytest.raises(ConfigError) as err:
        get_objective("zzzzzz")
    assert "did you mean" not in str(err.value)
