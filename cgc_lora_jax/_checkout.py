"""Import `cgc_lora_jax.models` / `cgc_lora_jax.configs` from a checkout's models/ and configs/.

The repository keeps the model families and the named configs beside the package, where a user
looks for them; installed, they must live inside the package namespace so that nothing named
`models` or `configs` lands in site-packages. A wheel copies the folders into the package
(setup.py's package_dir). Running from a checkout there is no copy, so a meta-path finder maps
the two names to the folders beside this package. It is put first on `sys.meta_path` so that,
in a virtual environment holding an editable install of another checkout, the checkout on
PYTHONPATH still gets its own models/ and configs/.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

FOLDERS = ("models", "configs")  # repository folders that are subpackages of cgc_lora_jax


class RepositoryFolderFinder(importlib.abc.MetaPathFinder):
    """Finds `<package>.<folder>` in `<root>/<folder>/` for each folder of FOLDERS."""

    def __init__(self, package: str, root: Path):
        self.names = {f"{package}.{folder}": root / folder for folder in FOLDERS}

    def find_spec(self, fullname, path=None, target=None):
        folder = self.names.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)])


def map_repository_folders(package: str, package_file: str) -> None:
    """Install the finder when `package` runs from a checkout (its folders are not inside it)."""
    package_dir = Path(package_file).resolve().parent
    root = package_dir.parent
    if (package_dir / "models").is_dir() or not (root / "models" / "__init__.py").is_file():
        return  # an installed wheel (the folders are inside), or not a checkout
    if not any(isinstance(f, RepositoryFolderFinder) and f.names.get(f"{package}.models") == root / "models"
               for f in sys.meta_path):
        sys.meta_path.insert(0, RepositoryFolderFinder(package, root))
