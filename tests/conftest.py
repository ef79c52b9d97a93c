import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tests import the project's top-level modules (model.py, train.py, ...) as a user's script would
sys.path.insert(0, ROOT)

# the tests run tiny models, where a second thread only adds synchronisation (and, on a busy
# machine, waiting for a core): one thread keeps the suite fast and its timing steady
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A tiny character dataset, prepared by the real prepare script."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("prep_char", os.path.join(ROOT, "data", "shakespeare_char", "prepare.py"))
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    d = tmp_path_factory.mktemp("chars")
    lines = ["the cat sat on the mat.", "a dog ran to the sun.", "to be or not to be."]
    prep.prepare(str(d), text="\n".join(lines[i % 3] for i in range(600)), quiet=True)
    return str(d)
