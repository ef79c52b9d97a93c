"""
Self-generated data for distillation (LLM-QAT's data-free distillation, Liu et al. 2023): the teacher's
own samples carry its output distribution and need no corpus we do not have. This module is the library;
data/smollm2_selfgen/prepare.py is the command.

  render_chat(template, messages, bos, eos)  a conversation in the model's (Jinja) chat template
  generate_rows(model, prompts, ...)         batched generation from prompts of any lengths, one row each
  chat_prompts()                             the built-in prompt list (instructions x topics)
  write_selfgen(model, tok, out_dir, ...)    the dataset: train.bin, val.bin, tokenizer.json, meta.json

Batching prompts of different lengths: model.generate takes one (B, T) block, and the model has no
padding mask, so left-padding would shift positions and let rows attend to padding. generate_rows instead
prefills the length every row has (the shortest prompt) and then decodes one position a step for all rows,
feeding a row its own prompt token while it is still inside its prompt and its sampled token after. Every
row sees exactly its own tokens at its own positions, as at batch 1; the only difference is that part of a
longer prompt goes through the cache one token at a time instead of in the prefill, the same arithmetic in
another summation order (tests/test_selfgen.py checks greedy tokens equal batch-1 model.generate's).
"""

import math
import os
import random

import numpy as np
import torch

from dataset import TokenWriter, atomic_write_text, write_meta
from model import sample_token
from speed import block_weights, compile_decode_step, fuse_projections, pack_weights, use_decode_paths


def render_chat(template, messages, bos_token="", eos_token="", add_generation_prompt=True):
    """The conversation (a list of {"role", "content"}) rendered by the model's chat template, as
    transformers renders it (sample.py's --chat renders its one user turn with it)."""
    if not template:
        raise ValueError("this model carries no chat template (not an instruction-tuned model, or a checkpoint "
                         "converted without one): chat prompts need one")
    import jinja2
    try:
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 bos_token=bos_token, eos_token=eos_token)
    except jinja2.TemplateError as e:
        raise ValueError(f"the model's chat template does not render ({e})") from None


def chat_ids(tok, template, question, bos_id, eos_id):
    """Token ids of `question` as one user turn, ready for the assistant's reply."""
    text = render_chat(template, [{"role": "user", "content": question}], tok.token_text(bos_id), tok.token_text(eos_id))
    return tok.encode_chat(text)  # the template writes its own special tokens, as sample.py --chat encodes it


def compiled_decode_step(model):
    """model.decode_step compiled with the CPU decoding paths (speed.py) installed, its projections joined and its bf16
    weights in blocks where the CPU multiplies bf16, a tied head's copy too: generation runs batched (its state-dict
    keys change: decode with it), all its weights end to end in one allocation (speed.pack_weights): one graph per
    batch size and cache length, batched rows included."""
    # a model's graphs (batch sizes, cache lengths) add up, and at dynamo's default limit of 8 a fullgraph
    # compile fails
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return compile_decode_step(pack_weights(block_weights(fuse_projections(use_decode_paths(model)), tied_too=True)))


@torch.no_grad()
def generate_rows(model, prompts, max_new_tokens, temperature=0.0, top_k=None, stop_ids=None, decode_step=None):
    """Continue each prompt (a list of token ids; lengths may differ) by up to max_new_tokens tokens, all
    rows in one batch (see the module docstring for how). A row stops after its stop id (stop_ids: one
    id or None per row, or one for all); sampling draws from torch's global generator (seed it first).
    decode_step: e.g. compiled_decode_step(model); its cache length is rounded up (model.cache_length), so
    that calls with prompts of other lengths reuse the graph of their batch size.
    Returns, per row, the generated ids only, its stop id included when it produced it."""
    B = len(prompts)
    lengths = [len(p) for p in prompts]
    if B == 0 or min(lengths) < 1:
        raise ValueError("every prompt needs at least one token (free text starts from the BOS token)")
    end = max(n + max_new_tokens for n in lengths)  # one past the last position any row may fill
    if end > model.config.block_size:
        raise ValueError(f"a prompt of {max(lengths)} tokens plus {max_new_tokens} new ones exceeds the model's "
                         f"context of {model.config.block_size}: shorten the prompt or lower max_new_tokens")
    stops = stop_ids if isinstance(stop_ids, (list, tuple)) else [stop_ids] * B
    device = model.embed_tokens.weight.device
    buf = torch.zeros(B, end, dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        buf[r, :len(p)] = torch.tensor(p, dtype=torch.long)
    length = torch.tensor(lengths, device=device)
    stop = torch.tensor([-1 if s is None else s for s in stops], device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    last = length + max_new_tokens  # a row's last position + 1
    start = min(lengths)
    cache = model.new_cache(B, model.cache_length(end))
    step = decode_step or model.decode_step
    logits = model.prefill(buf[:, :start], cache)
    for n in range(start, end):
        sampled = sample_token(logits, temperature, top_k)
        in_prompt = n < length
        token = torch.where(in_prompt, buf[:, n], sampled)
        writes = ~in_prompt & ~finished & (n < last)
        buf[:, n] = torch.where(writes, token, buf[:, n])
        finished |= writes & (token == stop)
        finished |= n + 1 >= last
        if bool(finished.all()) or n == end - 1:
            break
        logits = step(token.view(B, 1), torch.tensor([n], device=device), cache)
    out = []
    for r in range(B):
        new = buf[r, lengths[r]:last[r]].tolist()
        if stops[r] is not None and stops[r] in new:
            new = new[:new.index(stops[r]) + 1]
        out.append(new)
    return out


# -----------------------------------------------------------------------------
# the prompt list: instructions of several kinds over everyday topics. Chosen to be unlike the questions of
# data/chat_questions.json (no short factual questions there answered here), so that distilling on this
# data does not teach the evaluation's answers.

INSTRUCTIONS = [
    "Write a short poem about {}.", "Explain {} to a ten-year-old.", "Give three tips about {}.",
    "Write a short story that involves {}.", "What are the pros and cons of {}?", "Describe {} in a few sentences.",
    "Write a friendly email to a colleague about {}.", "List some interesting facts about {}.",
    "Why do people care about {}?", "Summarize the history of {} briefly.",
]
TOPICS = [
    "gardening", "the ocean", "learning a new language", "cooking pasta", "climate change", "the moon",
    "friendship", "running a marathon", "electric cars", "honey bees", "the internet", "coffee", "volcanoes",
    "saving money", "music lessons", "winter", "public libraries", "recycling", "mountains", "chess",
    "a rainy day", "birthday parties", "trains", "computers", "healthy sleep", "dogs", "bread baking",
    "the solar system", "city parks", "writing a diary",
]


def chat_prompts():
    """The built-in prompts: every instruction over every topic (300)."""
    return [instruction.format(topic) for topic in TOPICS for instruction in INSTRUCTIONS]


VAL_PROMPT_FRACTION = 0.1  # of the prompts, held out: the val split's chat turns answer prompts never trained on


def split_prompts(prompts, val_fraction, seed):
    """(train prompts, val prompts): a seeded shuffle, the held-out prompts never used for training."""
    order = list(prompts)
    random.Random(seed).shuffle(order)
    n_val = max(1, math.ceil(len(order) * val_fraction)) if val_fraction > 0 else 0
    return order[n_val:], order[:n_val]


# -----------------------------------------------------------------------------
# the dataset


def document_rows(n_rows, chat_fraction, prompt_cycle, rng):
    """n_rows row plans: ("chat", prompt) with probability chat_fraction, else ("free", None)."""
    rows = []
    for _ in range(n_rows):
        rows.append(("chat", next(prompt_cycle)) if prompt_cycle and rng.random() < chat_fraction else ("free", None))
    return rows


def cycle_prompts(prompts, rng):
    """The prompts over and over, reshuffled each round (a sampled reply differs each time it is asked)."""
    while prompts:
        order = list(prompts)
        rng.shuffle(order)
        yield from order


def generate_split(model, tok, writer, budget, prompts, g, progress=None):
    """Generate documents into `writer` (a dataset.TokenWriter) until it holds `budget` tokens. Each
    document is its prompt and reply (a chat turn; stops at the model's eos) or a free continuation from
    the BOS token (stops at the end-of-text token or max_new_tokens), followed by the end-of-text token
    that separates documents. Returns {"chat": documents, "free": documents}."""
    rng = random.Random(g.seed)
    cycle = cycle_prompts(prompts, rng) if prompts else None
    counts = {"chat": 0, "free": 0}
    while writer.n < budget:
        rows = document_rows(g.batch_size, g.chat_fraction, cycle, rng)
        prompt_ids = [chat_ids(tok, g.template, p, g.bos, g.eos) if kind == "chat" else [g.bos] for kind, p in rows]
        stops = [g.eos if kind == "chat" else g.eot for kind, _ in rows]
        replies = generate_rows(model, prompt_ids, g.max_new_tokens, g.temperature, g.top_k or None, stops,
                                getattr(g, "decode_step", None))
        for (kind, _), ids, reply in zip(rows, prompt_ids, replies):
            if writer.n >= budget:
                break
            doc = ids + [t for t in reply if t != g.eot] + [g.eot]
            writer.write(np.array(doc, dtype=np.int64))
            counts[kind] += 1
        if progress:
            progress(writer.n, budget)
    return counts


def write_selfgen(model, tok, out_dir, g, tokenizer_json, source="", progress=None):
    """Write out_dir/{train,val}.bin, tokenizer.json and meta.json from the model's own samples. g holds the
    settings (see data/smollm2_selfgen/prepare.py): tokens and val_tokens (the budgets), seed,
    batch_size, temperature, top_k, max_new_tokens, chat_fraction, prompts, and the model's template,
    bos, eos, eot ids. The validation split uses held-out prompts and its own random stream. Same settings
    and seed, same files (on the same machine and torch: sampling runs through floating point)."""
    os.makedirs(out_dir, exist_ok=True)
    train_prompts, val_prompts = split_prompts(g.prompts, VAL_PROMPT_FRACTION, g.seed)
    record = {}
    for split, budget, prompts, stream in (("val", g.val_tokens, val_prompts, 1), ("train", g.tokens, train_prompts, 0)):
        torch.manual_seed(g.seed * 2 + stream)  # each split its own stream: the val split is fixed by the seed
        writer = TokenWriter(os.path.join(out_dir, f"{split}.bin"), model.config.vocab_size)
        split_g = type(g)(**{**vars(g), "seed": g.seed * 2 + stream})
        counts = generate_split(model, tok, writer, budget, prompts, split_g,
                                progress and (lambda n, b, s=split: progress(s, n, b)))
        record[split] = {"tokens": writer.close(), "prompts": len(prompts), "documents": counts}
    atomic_write_text(os.path.join(out_dir, "tokenizer.json"), tokenizer_json)
    settings = {k: getattr(g, k) for k in ("tokens", "val_tokens", "seed", "batch_size", "temperature", "top_k",
                                           "max_new_tokens", "chat_fraction")}
    settings["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")  # other precision, other samples
    return write_meta(out_dir, model.config.vocab_size, "hf", tokenizer_file="tokenizer.json", eot_token=g.eot,
                      selfgen={"source": source, "settings": settings, "splits": record,
                               "val_prompts": sorted(val_prompts)})
