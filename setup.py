"""Build hook: the Hydra config tree lives at the repository root (``conf/``, where a checkout, an
editable install and the Flower app bundle keep it) and ships inside a plain wheel as
``fedem_flwr/conf``. Everything else about the package is declared in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConfig(build_py):
    """Copy ``conf/*.yaml`` into the built package; an editable install reads ``conf/`` in place."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        source = Path(__file__).parent / "conf"
        target = Path(self.build_lib) / "fedem_flwr" / "conf"
        shutil.copytree(source, target, dirs_exist_ok=True, ignore=lambda _d, names: [
            n for n in names if not n.endswith(".yaml") and not (Path(_d) / n).is_dir()])


setup(cmdclass={"build_py": BuildPyWithConfig})
