"""``--pin key=value`` parsing: typed values, aliases, and errors that name the allowed keys."""

from __future__ import annotations

import pytest

from autopar.cli import PIN_TYPES, parse_pins
from autopar.errors import UserInputError
from autopar.layout import Pins
from autopar.plan import Recompute, Schedule


def test_typed_values_and_aliases() -> None:
    pins = parse_pins(["tp=8", "pp=4", "mb=2", "zero=3", "recompute=Full", "sp=off", "schedule=interleaved-1f1b",
                       "v=2", "dp=16"]).as_dict()
    assert pins == {"tp": 8, "pp": 4, "micro_batch_size": 2, "zero_stage": 3, "recompute": Recompute.FULL,
                    "sequence_parallel": False, "schedule": Schedule.INTERLEAVED_1F1B, "virtual_stages": 2,
                    "dp": 16}
    assert set(pins) == set(PIN_TYPES)
    assert parse_pins(["sequence_parallel=true", "tp=2"]) == Pins(sequence_parallel=True, tp=2)
    assert parse_pins([]) == Pins()


@pytest.mark.parametrize(("pins", "match"), [
    (["tpp=8"], "unknown key 'tpp'; allowed keys: dp, tp, pp, micro_batch_size, zero_stage, recompute, "
                "sequence_parallel, schedule, virtual_stages"),
    (["tp"], "expected key=value"),
    (["tp=eight"], "tp=eight: expected an integer"),
    (["sp=maybe"], "expected true/false/on/off"),
    (["recompute=some"], "expected one of none, selective, full"),
    (["schedule=zb"], "expected one of gpipe, 1f1b, interleaved-1f1b"),
    (["tp=2", "tp=4"], "given twice"),
    (["sp=on", "tp=1"], "sequence_parallel=true needs tp > 1"),  # pins checked against each other once, here
    (["zero=4"], "zero_stage=4 must be 0, 1, 2 or 3"),
])
def test_errors(pins: list[str], match: str) -> None:
    with pytest.raises(UserInputError, match=match.replace("(", r"\(")):
        parse_pins(pins)
