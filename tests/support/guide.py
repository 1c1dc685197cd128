"""Run docs/deployment.md as written: each fenced ``bash`` block right after a
``<!-- test: NAME -->`` line is a step a test runs by name, in ``bash``, with the guide's
variables (``HUB_DIR``, ``HUB_PORT``, ``NODE_KEY``, ...) taken from the test's environment.

So the guide cannot drift from what is tested: a renamed flag or a missing step fails the test
that runs it, and a step no test runs is reported by ``untested_steps``.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

from fedem_flwr.errors import FlowerProcessError
from fedem_flwr.launch.processes import FlowerProcess, flower_env, spawn

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"
_STEP = re.compile(r"<!-- test: ([\w-]+) -->\s*\n```bash\n(.*?)\n```", re.DOTALL)


def guide_steps(path: Path = GUIDE) -> dict[str, str]:
    """Step name -> its bash block, in the guide's order."""
    steps: dict[str, str] = {}
    for name, block in _STEP.findall(path.read_text(encoding="utf-8")):
        if name in steps:
            raise ValueError(f"{path}: step {name!r} appears twice")
        steps[name] = block
    return steps


def untested_steps(ran: Iterable[str], path: Path = GUIDE) -> list[str]:
    """The guide's steps not in ``ran``."""
    done = set(ran)
    return [name for name in guide_steps(path) if name not in done]


class Guide:
    """The guide's steps, run with ``variables`` in a Flower environment rooted at ``flwr_home``."""

    def __init__(self, variables: Mapping[str, str], flwr_home: Path, path: Path = GUIDE) -> None:
        self.steps = guide_steps(path)
        self.variables = dict(variables)
        self.flwr_home = flwr_home
        self.ran: list[str] = []

    def script(self, step: str, extra_args: str = "") -> str:
        """The step's block; ``extra_args`` are appended to its last command."""
        if step not in self.steps:
            raise KeyError(f"docs/deployment.md has no step {step!r}; it has {', '.join(self.steps)}")
        self.ran.append(step)
        return self.steps[step] + (f" {extra_args}" if extra_args else "")

    def run(self, step: str, *, extra_args: str = "", cwd: Path | None = None,
            env: Mapping[str, str] | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run a step to its end; FlowerProcessError with its output when it fails."""
        script = self.script(step, extra_args)
        try:
            done = subprocess.run(  # noqa: S603 (the guide's own block)
                ["bash", "-euo", "pipefail", "-c", script], cwd=cwd,
                env=flower_env(self.flwr_home, {**self.variables, **(env or {})}),
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
            )
        except subprocess.TimeoutExpired as err:
            raise FlowerProcessError(f"guide step {step!r} did not finish in {timeout:.0f} s") from err
        if done.returncode != 0:
            raise FlowerProcessError(
                f"guide step {step!r} failed (exit {done.returncode}):\n{script}\n{done.stdout}{done.stderr}")
        return done

    def start(self, step: str, kind: str, port: int, cwd: Path, *,
              env: Mapping[str, str] | None = None) -> FlowerProcess:
        """Start a long-running step (a SuperLink, a SuperNode) in the background; stop it by pid."""
        script = self.script(step)
        return spawn(kind, ["bash", "-eu", "-c", script], self.flwr_home, port, cwd,
                     env={**self.variables, **(env or {})})
