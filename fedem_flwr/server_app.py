"""The ServerApp: compose the config, open the hub (exclusively), relay until a stop condition.

Under ``flwr run`` this runs in the SuperLink's working directory and environment, not the
caller's: the hub folder comes from the run config key ``hub`` (absolute) or the default.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedem_flwr.config.loader import load_run_config
from fedem_flwr.errors import ConfigError
from fedem_flwr.hub.paths import HubWriterLock, resolve_hub_path
from fedem_flwr.logs import use_flower_logging
from fedem_flwr.quiet import quiet_library_progress
from fedem_flwr.relay.bootstrap import open_hub
from fedem_flwr.relay.keeper import BaseKeeper
from fedem_flwr.relay.strategy import RelayStrategy, is_simulation_grid
from fedem_flwr.simulation.run import run_simulation

log = logging.getLogger(__name__)
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    use_flower_logging()
    quiet_library_progress()
    cfg = load_run_config(context.run_config)
    hub_path = resolve_hub_path(cfg.hub.path, require_absolute=True)
    if cfg.sim.clock == "virtual":
        if not is_simulation_grid(grid):
            raise ConfigError("`sim.clock=virtual` is for simulations; a SuperLink's federation runs in real time.")
        with HubWriterLock(hub_path):
            run_simulation(grid, cfg, hub_path)
        print(f"fedem simulation ({cfg.sim.method}) finished; result in {hub_path}/sim/result.json")
        return
    with HubWriterLock(hub_path):
        hub = open_hub(cfg, hub_path)
        keeper = BaseKeeper(hub)
        strategy = RelayStrategy(
            hub.coordinator, cfg.relay, hub.workbench.spec, max_steps=cfg.train.max_steps,
            training_rows=hub.training_rows, between_turns=keeper.turn,
        )
        result = strategy.start(grid)
        keeper.finish()
        base = hub.registry.latest_checkpoint()
    print(
        f"fedem relay finished ({result.stopped_by}): {result.accepted} accepted, {result.rejected} rejected, "
        f"{result.leases} leases in {result.seconds:.0f} s; base v{base.version} ({base.source}). Inspect with: fedem --hub {hub_path} status"
    )
