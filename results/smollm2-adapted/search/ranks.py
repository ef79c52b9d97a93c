"""Where each switch a search chose stood among the single switches still allowed at its step.

adapt.search_kv_source scores only the --search=K best single switches still allowed (by the matrix);
a chosen switch ranked near K says that more candidates could have changed the map. Run from the
repository root:

    PYTHONPATH=. .venv/bin/python results/smollm2-adapted/search/ranks.py MATRIX.pt 7:0,6:0,...

MATRIX.pt: adapt.py's logit_kl_similarity.pt; then the switches in the order the search chose them
(layer:the layer whose K/V it reads), as its log prints them.
"""
import sys

import torch

from adapt import may_switch, switch_pairs

similarity = torch.load(sys.argv[1], weights_only=True)
kv_source = list(range(similarity.shape[0]))
ranked = switch_pairs(similarity, 0)
for pair in sys.argv[2].split(","):
    layer, source = map(int, pair.split(":"))
    allowed = [(i, j) for _, i, j in ranked if may_switch(kv_source, i, j)]
    print(f"layer {layer} reads {source}: rank {allowed.index((layer, source)) + 1} of {len(allowed)} allowed")
    kv_source[layer] = source
