import os
import sys

# tests import the project's top-level modules (model.py, train.py, ...) as a user's script would
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
