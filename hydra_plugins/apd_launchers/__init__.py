"""apd's Hydra launcher plugins. ``hydra_plugins/`` (no ``__init__.py``: a namespace package shared
with the installed plugins) sits at the repo root, so Hydra's plugin scan finds it when commands run
from there, as ``python -m experiments.decompose`` does.

The launcher needs hydra-submitit-launcher (``pip install -e ".[sweeps]"``). Without it, importing
this package is a no-op, so Hydra's scan does not warn on every run.
"""

try:
    from hydra_plugins.apd_launchers._slurm import ApdSlurmLauncher
except ModuleNotFoundError as e:
    if not (e.name or "").startswith(("hydra_plugins.hydra_submitit_launcher", "submitit")):
        raise
else:
    __all__ = ["ApdSlurmLauncher"]
