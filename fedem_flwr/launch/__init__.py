"""Launch Flower apps for real: local simulation runs, SuperLinks and SuperNodes on loopback.

`run_app` is what `python -m fedem_flwr.launch run` does; `processes` and `flwr_cli` are the
parts the test harness (`fedem_flwr.testing.flower`) shares. Nothing here imports flwr:
Flower is driven through its own executables, as a user would.
"""

from fedem_flwr.launch.flwr_cli import run_status, submit_run, wait_for_run, write_connection
from fedem_flwr.launch.local import (
    DEFAULT_FEDERATION_CONFIG,
    RunOutcome,
    default_flwr_home,
    run_app,
    running_superlink,
    stop_superlink,
)
from fedem_flwr.launch.processes import FlowerProcess, free_ports, start_superlink, start_supernode

__all__ = [
    "DEFAULT_FEDERATION_CONFIG", "FlowerProcess", "RunOutcome", "default_flwr_home", "free_ports",
    "run_app", "run_status", "running_superlink", "start_superlink", "start_supernode",
    "stop_superlink", "submit_run", "wait_for_run", "write_connection",
]
