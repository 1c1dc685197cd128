"""One simulated federation on the virtual clock, as the ServerApp runs it (``sim.clock=virtual``).

The hub opens as in deployment, on the virtual clock; then the method runs on the ``VirtualGrid``:
the relay (its Strategy, coordinator and base keeper, unchanged) or a FedAvg baseline. Either way
the run leaves ``sim/trace.csv`` and ``sim/result.json`` in the hub folder (``record``).

A relay's trace rows carry each language's held-out loss as the hub last judged it and, with a test
split, its test loss as the run stands (``evaluation.TestCurve``: only what changed is evaluated
again). Its result adds what a study reads after the run (``evaluation``): the final numbers on the
test split (held-out too), the base alone, each published merge with its absorbed languages' losses
just before and after, merge attempts and publications, and each adapter's share of the tokens.

Every method's result on the virtual clock carries its lease utilisation (``simulation.utilisation``:
``lease_utilisation``, ``lease_seconds``, ``online_seconds``); a relay's adds the ceiling its lanes
allow (``utilisation_ceiling``, ``utilisation_of_ceiling``, ``ceiling_inputs``), which FedAvg, with no
lane rule, leaves empty.

Every method's result also says what contributors spent judging their peers (``gate.peers``):
``contributor_time`` (``training_s``: useful lease seconds; ``peer_eval_s``; ``peer_eval_share``). A relay's
adds ``peer_waiting`` (seconds pushes waited for their peers) and, with ``sim.score_decisions``,
``decisions``: every concluded push judged afterwards on the test split (``simulation.decisions``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from flwr.serverapp import Grid

from fedem_flwr.config.schema import FedemConfig
from fedem_flwr.model.lora import read_adapter_state
from fedem_flwr.relay.bootstrap import Hub, open_hub
from fedem_flwr.relay.keeper import BaseKeeper
from fedem_flwr.relay.strategy import RelayStrategy
from fedem_flwr.simulation.clock import VirtualClock
from fedem_flwr.simulation.decisions import (
    ScoredDecision,
    contributor_time,
    decision_summary,
    peer_waiting,
    scoring_decisions,
)
from fedem_flwr.simulation.evaluation import (
    TestCurve,
    base_alone,
    base_folder_of,
    final_losses,
    final_split,
    merge_counts,
    merge_events,
    relay_adapter_tokens,
    study_fields,
)
from fedem_flwr.simulation.fedavg import run_fedavg
from fedem_flwr.simulation.record import Trace, read_result, write_result
from fedem_flwr.simulation.shadow import shadowing
from fedem_flwr.simulation.virtual_grid import VirtualGrid

log = logging.getLogger(__name__)
T = TypeVar("T")


def run_simulation(grid: Grid, cfg: FedemConfig, hub_path: Path) -> dict[str, Any]:
    """Run ``cfg.sim.method`` on the virtual clock over Flower's simulation ``grid``; returns the
    result it wrote (``sim/result.json``)."""
    clock = VirtualClock()
    hub = open_hub(cfg, hub_path, clock=clock)
    block = cfg.data.block_size
    vgrid = VirtualGrid(grid, clock, cfg.sim, cfg.seed, max_steps=cfg.train.max_steps, block_size=block,
                        tokens_per_step=cfg.train.batch_size * cfg.train.grad_accum * block,
                        adapter_spec=hub.workbench.spec)
    trace = Trace(hub_path)
    started = time.monotonic()
    try:
        if cfg.sim.method == "relay":
            result = _relay(hub, vgrid, clock, trace, started)
        else:
            result = run_fedavg(vgrid, hub, cfg, clock, trace, counters=vgrid.counters,
                                more=lambda: {"timing": vgrid.timing(), **vgrid.utilisation(),
                                              "contributor_time": _contributor_time(vgrid)})
    finally:
        trace.close()
    log.info("Simulation of %s done: %.0f simulated s in %.0f s; %d tokens (%d wasted)",
             cfg.sim.method, clock.elapsed, time.monotonic() - started, result["tokens"], result["tokens_wasted"])
    return result


def _relay(hub: Hub, vgrid: VirtualGrid, clock: VirtualClock, trace: Trace, started: float) -> dict[str, Any]:
    cfg = hub.cfg
    keeper = BaseKeeper(hub, clock=clock, cpt_steps_per_s=cfg.sim.hub_cpt_speed)
    counters = vgrid.counters
    initial = base_alone(hub, base_folder_of(hub, 0))  # on the final split, as every method's initial losses
    curve = TestCurve(hub)
    trace.row(clock.elapsed, counters, losses=current_losses(hub), test_losses=curve.update(),  # where it starts
              **vgrid.usage())

    def spent() -> int:
        return counters.tokens + keeper.cpt_tokens

    timing: dict[str, float] = {}
    turn = _timed(keeper.turn, timing, "base_keeper_s")
    test_curve = _timed(curve.update, timing, "test_curve_s")

    def between_turns(busy: bool) -> None:
        turn(busy)
        if busy:
            _trace_row(hub, vgrid, trace, spent(), test_losses=test_curve())

    def budget_spent() -> str:
        budget = cfg.sim.max_tokens
        return f"token budget of {budget} spent" if budget is not None and spent() >= budget else ""

    strategy = RelayStrategy(
        hub.coordinator, cfg.relay, hub.workbench.spec, max_steps=cfg.train.max_steps, clock=clock,
        sleep=vgrid.advance, training_rows=hub.training_rows, between_turns=between_turns, stop_when=budget_spent,
    )
    relay_started = time.monotonic()
    decisions: list[ScoredDecision] = []
    scoring = scoring_decisions(hub, decisions) if cfg.sim.score_decisions else nullcontext()
    with _timing_calls(hub.coordinator, "receive_push", timing, "judging_s"), scoring:
        result = strategy.start(vgrid)
    timing["relay_s"] = time.monotonic() - relay_started
    keeper.finish()
    counters.accepted, counters.rejected = result.accepted, result.rejected
    counters.tokens += keeper.cpt_tokens
    losses = relay_final_losses(hub)
    testing = final_split(hub) == "test"
    heldout = relay_final_losses(hub, split="heldout") if testing else losses
    _trace_row(hub, vgrid, trace, counters.tokens, heldout, test_losses=losses if testing else None)
    study = study_fields(hub, initial=initial, base=base_alone(hub), heldout=heldout,
                         adapter_tokens=relay_adapter_tokens(hub.registry))
    study.update(merge_counts(hub.registry), merges=merge_events(hub, t0=clock.start))
    timing["final_evaluation_s"] = time.monotonic() - relay_started - timing["relay_s"]
    adapters = {adapter.name: adapter.languages for adapter in hub.registry.adapters()}
    study.update(vgrid.utilisation(adapters, lanes=cfg.relay.lanes))
    study.update(contributor_time=_contributor_time(vgrid), peer_waiting=peer_waiting(hub.registry))
    if cfg.sim.score_decisions:
        study["decisions"] = decision_summary(decisions, hub.workbench.weights or {}, cfg.gate.hub_min_tokens)
        study["decision_rows"] = [decision.as_json() for decision in decisions]
    write_result(hub.path, method="relay", losses=losses, counters=counters, sim_seconds=clock.elapsed,
                 wall_seconds=time.monotonic() - started,
                 extra={"stopped_by": result.stopped_by, "cpt_tokens": keeper.cpt_tokens, **study,
                        "budget_tokens": cfg.sim.max_tokens, "base_version": hub.registry.latest_checkpoint().version,
                        "timing": {**vgrid.timing(), **{key: round(value, 2) for key, value in timing.items()}}})
    return read_result(hub.path)


def _contributor_time(vgrid: VirtualGrid) -> dict[str, float]:
    return contributor_time(vgrid.usage()["lease_s"], vgrid.counters.peer_eval_s)


def _timed(call: Callable[..., T], timing: dict[str, float], key: str) -> Callable[..., T]:
    """``call``, adding its real seconds to ``timing[key]``: where a simulation's wall time goes."""

    def timed(*args: Any, **kwargs: Any) -> T:
        started = time.monotonic()
        try:
            return call(*args, **kwargs)
        finally:
            timing[key] = timing.get(key, 0.0) + time.monotonic() - started

    return timed


@contextmanager
def _timing_calls(owner: Any, method: str, timing: dict[str, float], key: str) -> Iterator[None]:
    """Time ``owner.method`` while the block runs (``shadowing``), then undo that."""
    with shadowing(owner, method, lambda call: _timed(call, timing, key)):
        yield


def current_losses(hub: Hub) -> dict[str, float]:
    """Each held-out set's loss as last judged (a language's, or a task's): its adapter's latest version
    on its base."""
    terms = hub.coordinator.terms
    losses: dict[str, float] = {}
    for name, version in hub.registry.latest_adapter_versions().items():
        heldout = version.metrics.get("heldout", {})
        for language in terms[name].heldout_keys if name in terms else ():
            if language in heldout:
                losses[language] = float(heldout[language])
    return losses


def relay_final_losses(hub: Hub, split: str | None = None) -> dict[str, float]:
    """Each held-out set's adapter (a language's, or a task adapter's), at its latest version, on the
    latest base: evaluated now on ``split`` (default: the final split), as every method's final numbers are."""
    base = hub.registry.latest_checkpoint()
    states = {}
    for name, terms in hub.coordinator.terms.items():
        version = hub.registry.latest_adapter_version(name)
        state = read_adapter_state(hub.store.get(version.ref))
        for key in terms.heldout_keys:
            states[key] = state
    return final_losses(hub, states, base_folder=hub.store.get(base.ref), split=split)


def _trace_row(hub: Hub, vgrid: VirtualGrid, trace: Trace, tokens: int, losses: dict | None = None, *,
               test_losses: dict | None = None) -> None:
    counts = hub.registry.contribution_counts()
    snapshot = replace(vgrid.counters, tokens=tokens, accepted=counts.get("accepted", 0),
                       rejected=sum(n for decision, n in counts.items() if decision != "accepted"))
    trace.row(vgrid.clock.elapsed, snapshot, leases_active=vgrid.leases_active, online=vgrid.online_count(),
              losses=losses if losses is not None else current_losses(hub), test_losses=test_losses, **vgrid.usage())
