"""Launch Flower apps for real: local simulation runs, SuperLinks and SuperNodes on loopback.

`local.run_app` is what `fedem run` does; `processes` and `flwr_cli` are the parts the test
harness (`tests.support.flower`) shares. Nothing here imports flwr: Flower is driven through
its own executables, as a user would.
"""
