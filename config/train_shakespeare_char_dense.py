# The dense twin of the default run: the same model, data and schedule with every layer owning its
# K/V. Run both and compare the val loss and tokens/s in the two log.jsonl files:
#   .venv/bin/python train.py                                         # shared, out-shakespeare-char/
#   .venv/bin/python train.py config/train_shakespeare_char_dense.py  # dense,  out-shakespeare-char-dense/
import os

exec(open(os.path.join(os.path.dirname(__file__), "train_shakespeare_char.py")).read())
out_dir = "out-shakespeare-char-dense"
kv_source = "dense"
