"""Let ``tune run recipes/<name>`` find this project's ``recipes`` package.

torchtune 0.6.1's wheel installs a top-level ``recipes`` package into
site-packages whose ``__init__`` raises. ``tune run recipes/x`` without
torchrun flags appends the working directory to the END of ``sys.path`` and
then runs ``runpy.run_module("recipes.x")``, so torchtune's package is found
first and the recipe fails with ``ModuleNotFoundError``. ``python -m recipes.x``
and torchrun do not have the problem: they put the working directory first.

Importing this module puts a finder at the front of ``sys.meta_path`` that
resolves ``recipes`` to ``<cwd>/recipes`` whenever ``<cwd>/recipes/__init__.py``
exists and declares itself this project's (it holds ``MARKER``), which is what
``python -m recipes.x`` from that directory would do.
Submodules such as ``recipes.x`` then follow the package's ``__path__`` through
the normal path finder. Everywhere else the finder declines and import goes on
as before.

The build backend ships this file and a ``.pth`` that imports it into
site-packages, so the finder is installed at interpreter start-up by both
``pip install .`` and ``pip install -e .``.
"""

import importlib.abc
import importlib.util
import os
import sys

_PACKAGE = "recipes"
# Only a recipes/ package whose __init__.py holds this line is ours to resolve.
MARKER = "ttt-omni recipes"


class RecipesFinder(importlib.abc.MetaPathFinder):
    """Resolves the top-level ``recipes`` package to the working directory's."""

    def find_spec(self, fullname, path=None, target=None):
        """Returns a spec for ``<cwd>/recipes`` or None to defer.

        Args:
            fullname (str): absolute name of the module being imported.
            path (Optional[Sequence[str]]): the parent's ``__path__``; None for
                top-level modules.
            target (Optional[types.ModuleType]): module being reloaded, if any.

        Returns:
            Optional[importlib.machinery.ModuleSpec]: the package spec when
            ``fullname`` is ``recipes`` and ``<cwd>/recipes/__init__.py``
            exists and holds ``MARKER``, otherwise None.
        """
        # Only the top-level name: once our package is imported its __path__
        # points at <cwd>/recipes, so recipes.<anything> resolves there already.
        if fullname != _PACKAGE:
            return None
        try:
            package_dir = os.path.join(os.getcwd(), _PACKAGE)
        except OSError:  # the working directory was deleted
            return None
        init_file = os.path.join(package_dir, "__init__.py")
        if not os.path.isfile(init_file) or not _is_ours(init_file):
            return None
        return importlib.util.spec_from_file_location(
            _PACKAGE, init_file, submodule_search_locations=[package_dir]
        )


def _is_ours(init_file):
    """Whether ``init_file`` marks its package as this project's recipes."""
    try:
        with open(init_file, encoding="utf-8", errors="replace") as f:
            return MARKER in f.read(4096)
    except OSError:
        return False


def install():
    """Puts one ``RecipesFinder`` at the front of ``sys.meta_path``.

    Idempotent; matching by module and class name rather than ``isinstance``
    also covers a reloaded copy of this module.
    """
    ours = (__name__, RecipesFinder.__qualname__)
    if not any((type(f).__module__, type(f).__qualname__) == ours for f in sys.meta_path):
        sys.meta_path.insert(0, RecipesFinder())


install()
