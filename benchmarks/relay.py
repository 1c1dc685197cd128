"""The relay's two performance goals, in one entry point.

    python benchmarks/relay.py scheduler [--adapters 10000 --nodes 1000 ...]   # target: < 2 ms a lease
    python benchmarks/relay.py simulation [--contributors 20,100 --accepted 40 ...]

``scheduler`` is ``relay_scheduler.py`` (lease acquire + push check + release + policy choice,
in memory and persisted in SQLite); ``simulation`` is ``simulation.py`` (contributions per minute
of a `flwr run` simulation of the whole app on the virtual clock, and where the time goes). Each
takes ``--save``/``--baseline``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import relay_scheduler  # noqa: E402
import simulation  # noqa: E402

COMMANDS = {"scheduler": relay_scheduler.main, "simulation": simulation.main}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__)
        return 2
    command = sys.argv.pop(1)
    return COMMANDS[command]() or 0


if __name__ == "__main__":
    raise SystemExit(main())
