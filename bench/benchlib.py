"""What the Python benchmark scripts share: where the test data is, and how
they run moec's tools (output captured, a failure raises)."""
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "tests", "data")


def run(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout

# The bundled Brown text (held-out and calibration splits) and fixtures.
HELDOUT = os.path.join(DATA, "brown", "heldout.jsonl")
CALIBRATION = os.path.join(DATA, "brown", "calibration.jsonl")


def fixture_dir(name):
    return os.path.join(DATA, "fixtures", name)
