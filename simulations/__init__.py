"""Policy research on simulated federations: sweeps of cells (``sweep``, ``cells``) and their
report (``report``)."""
