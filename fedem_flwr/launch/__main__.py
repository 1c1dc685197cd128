"""`python -m fedem_flwr.launch run APP_DIR ...`: see `fedem_flwr.launch.cli`."""

from fedem_flwr.launch.cli import main

if __name__ == "__main__":
    main()
