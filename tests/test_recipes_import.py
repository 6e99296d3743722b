"""``tune run recipes/<name>`` runs this project's recipes, not torchtune's.

torchtune installs a top-level ``recipes`` package that shadows ours under
``tune run`` (see ``build_backend/ttt_omni_recipes_hook.py``). These tests run
the installed ``tune`` console script and plain interpreters in temporary
directories, so they check the installed start-up hook, not this checkout.
"""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

_HELLO = """\
import sys
print("HELLO-FROM-TMP", __file__, sys.argv[1:])
"""

_REINSTALL = 'reinstall the project with `python -m pip install -e ".[dev]"`'

# Prints where `recipes` resolves with the hook and with it removed.
_RESOLVE = """\
import importlib.util, json, sys
def origin():
    spec = importlib.util.find_spec("recipes")
    return spec and spec.origin
hooked = origin()
installed = any(type(f).__name__ == "RecipesFinder" for f in sys.meta_path)
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "RecipesFinder"]
print(json.dumps({"installed": installed, "hooked": hooked, "plain": origin()}))
"""


def _run(cmd, cwd):
    """Runs ``cmd`` in ``cwd`` without PYTHONPATH; returns stdout, failing on rc != 0."""
    # No PYTHONPATH: the hook alone must make recipes/ importable.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{cmd} failed ({_REINSTALL}?):\n{proc.stderr[-3000:]}"
    return proc.stdout


def _hello_line(stdout):
    """Returns the marker line printed by ``recipes/hello.py``."""
    lines = [line for line in stdout.splitlines() if line.startswith("HELLO-FROM-TMP")]
    assert len(lines) == 1, stdout
    return lines[0]


def test_tune_run_uses_cwd_recipes(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "__init__.py").write_text('"""ttt-omni recipes"""\n')
    (tmp_path / "recipes" / "hello.py").write_text(_HELLO)
    # The console script itself, not `python -m`, which would put cwd first on
    # sys.path and hide the problem.
    tune = Path(sysconfig.get_path("scripts")) / "tune"
    assert tune.is_file(), f"no tune console script at {tune}"

    args = ["--config", "x.yaml", "seed=1"]
    via_tune = _hello_line(_run([str(tune), "run", "recipes/hello", *args], tmp_path))
    via_python = _hello_line(_run([sys.executable, "-m", "recipes.hello", *args], tmp_path))

    hello = os.path.realpath(tmp_path / "recipes" / "hello.py")
    assert via_tune == f"HELLO-FROM-TMP {hello} {args}"
    assert via_tune == via_python


@pytest.mark.parametrize("layout", ["no_recipes_dir", "recipes_dir_without_init", "another_projects_recipes"])
def test_hook_defers_elsewhere(tmp_path, layout):
    if layout != "no_recipes_dir":
        (tmp_path / "recipes").mkdir()
        (tmp_path / "recipes" / "hello.py").write_text(_HELLO)
    if layout == "another_projects_recipes":
        (tmp_path / "recipes" / "__init__.py").write_text("")

    result = json.loads(_run([sys.executable, "-c", _RESOLVE], tmp_path))

    assert result["installed"], f"recipes hook not installed; {_REINSTALL}"
    assert result["hooked"] == result["plain"]
