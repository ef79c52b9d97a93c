import os
import sys

import torch

# tests import the project's top-level modules (model.py, train.py, ...) as a user's script would
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# the tests run tiny models, where a second thread only adds synchronisation (and, on a busy
# machine, waiting for a core): one thread keeps the suite fast and its timing steady
torch.set_num_threads(1)
