"""layerprune: find the redundant top layers of a fine-tuned encoder with CKA and drop them."""

from importlib.util import spec_from_file_location
from pathlib import Path
import sys

__version__ = "0.1.0"

# The server is layerprune.serve. Its code stays in the repository's top-level serve/ folder (`python -m serve`
# from a clone), which setuptools installs as layerprune/serve (pyproject.toml's package-dir): no top-level
# `serve` package in a user's environment. Run from a clone, where there is no layerprune/serve, this finder
# gives the folder the same name, so there is one module tree for the server whichever way it is started.
_CLONE_SERVER = Path(__file__).resolve().parent.parent / "serve"


class _CloneServerFinder:
    """importlib's meta path finder protocol, for the one name layerprune.serve."""

    @staticmethod
    def find_spec(name: str, path=None, target=None):
        if name != "layerprune.serve":
            return None
        return spec_from_file_location(name, _CLONE_SERVER / "__init__.py",
                                       submodule_search_locations=[str(_CLONE_SERVER)])


if not (Path(__file__).parent / "serve").is_dir() and (_CLONE_SERVER / "__init__.py").is_file():
    sys.meta_path.insert(0, _CloneServerFinder())
