"""Zeus's cost by hand, the run cost of the batch-size search (time only without energy), and
eta checks that name the caller's field."""

from __future__ import annotations

import pytest

from lit.energy.cost import check_eta, run_cost, zeus_cost


def test_zeus_cost_by_hand() -> None:
    assert zeus_cost(energy_j=100.0, time_s=2.0, eta_knob=0.25, max_power_w=300.0) == 0.25 * 100 + 0.75 * 600
    assert zeus_cost(100.0, 2.0, 1.0, 300.0) == 100.0  # energy only
    assert zeus_cost(100.0, 2.0, 0.0, 300.0) == 600.0  # time only, in joules at MaxPower


def test_run_cost_is_joules_with_energy_and_seconds_without() -> None:
    assert run_cost(3000.0, 10.0, eta_knob=0.5, max_power_w=700.0) == pytest.approx(0.5 * 3000 + 0.5 * 7000)
    assert run_cost(3000.0, 10.0, eta_knob=1.0, max_power_w=700.0) == pytest.approx(3000.0)
    assert run_cost(None, 10.0) == 10.0  # not measured: time-to-accuracy


@pytest.mark.parametrize("call, match", [
    (lambda: run_cost(5.0, 1.0, eta_knob=1.5, max_power_w=700.0), "eta_knob must be in"),
    (lambda: run_cost(5.0, 1.0, eta_knob=0.5), "max_power_w"),
    (lambda: run_cost(None, -1.0), "time_s must be >= 0"),
    (lambda: check_eta(-0.1), r"eta_knob must be in \[0, 1\].*-0.1"),
    (lambda: check_eta(2.0, "--eta"), "--eta must be in"),
])
def test_bad_input_names_the_field(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()
    assert check_eta(0.0) == 0.0 and check_eta(1.0) == 1.0
