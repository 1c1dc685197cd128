"""`python -m fedem_flwr.cli`: the `fedem` command."""

from fedem_flwr.cli import main

main()
