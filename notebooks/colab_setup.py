"""The notebooks' set-up (Colab or a fresh machine): install moejax from the checkout at `root` if it is not
importable yet, and make `root` the working directory and the first import path (configs/ and experiments/
live there). Standard library only: it runs before moejax is installed. Each notebook's first cell finds the
checkout (or clones it) and calls `setup(root)`."""
import importlib
import importlib.util
import os
import subprocess
import sys


def setup(root: str) -> str:
    """-> the absolute repository root, now the working directory."""
    root = os.path.abspath(root)
    if importlib.util.find_spec("moejax") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", root], check=True)
        importlib.invalidate_caches()
    os.chdir(root)
    if root not in sys.path:
        sys.path.insert(0, root)
    return root
