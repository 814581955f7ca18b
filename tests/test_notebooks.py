"""Notebooks: every notebooks/*.py (jupytext percent format) has an output-free .ipynb twin with the same
cells whose first code cell installs moejax, and runs as a plain script in smoke mode (a few steps)."""
import json
import os
import pathlib
import subprocess
import sys

import jupytext
import pytest

from tests.conftest import FAST_COMPILE

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.py") if p.stem != "colab_setup")  # the helper
RESYNC = "regenerate it: jupytext --sync notebooks/{0}.py (or jupytext --to ipynb notebooks/{0}.py)"


def cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source) for c in nb.cells]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_pair_matches(name):
    """The .ipynb holds the .py's cells (types and sources; metadata aside), no outputs, and the install cell."""
    py, ipynb = ROOT / "notebooks" / f"{name}.py", ROOT / "notebooks" / f"{name}.ipynb"
    assert ipynb.is_file(), f"{ipynb} is missing; " + RESYNC.format(name)
    script, nb = jupytext.read(py), jupytext.read(ipynb)
    assert script.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent", f"{py}: jupytext header"
    assert cells(script) == cells(nb), f"{ipynb} differs from {py}; " + RESYNC.format(name)
    stored = json.loads(ipynb.read_text())["cells"]
    executed = [i for i, c in enumerate(stored) if c.get("outputs") or c.get("execution_count") is not None]
    assert not executed, f"{ipynb}: cells {executed} hold outputs; clear them, or " + RESYNC.format(name)
    assert nb.cells[0].cell_type == "markdown", f"{ipynb}: the first cell is the title (markdown)"
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert code and "from colab_setup import setup" in code[0], \
        f"{ipynb}: the first code cell clones moejax and calls notebooks/colab_setup.py (Colab)"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_runs_in_smoke_mode(name, tmp_path):
    """`python notebooks/NAME.py` exits 0 with MOEJAX_NOTEBOOK_SMOKE=1 in a fresh workdir, on CPU, with this
    checkout's moejax first on the path (so the install cell never installs anything)."""
    env = {**os.environ, "MOEJAX_NOTEBOOK_SMOKE": "1", "MPLBACKEND": "Agg",
           "MOEJAX_NOTEBOOK_WORKDIR": str(tmp_path / "workdir"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu"}  # one CPU device; compiling is most of a smoke run (conftest)
    proc = subprocess.run([sys.executable, str(ROOT / "notebooks" / f"{name}.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"notebooks/{name}.py exited {proc.returncode}\n--- stdout (tail)\n"
                                  f"{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-6000:]}")
