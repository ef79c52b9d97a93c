"""Where the teacher's greedy answer to a chat question ends, how likely each model finds the end of its turn.

For each of data/chat_questions.json's questions: the teacher's greedy answer (fp32, at most 48 tokens, as
evaluate.py's chat); where it ends with the eos inside those 48, every model reads the prompt and the teacher's
answer (teacher-forced) and gives its probability of eos at the answer's last position, and whether eos is its
likeliest token there. Each model's own greedy answers: how many end within the 48 tokens. Run from the repository
root, after the deltas exist:

    PYTHONPATH=. .venv/bin/python results/smollm2-adapted/end-weight/end_probability.py DELTA [DELTA ...]
"""

import json
import statistics
import sys

import torch

from checkpoint import load_model
from delta import load_with_delta
from fidelity import chat_prompts, greedy_replies
from tokenizer import HFTokenizer

BASE = "data/smollm2/smollm2-135m-instruct.pt"


def end_probabilities(model, prompts, replies, eos):
    """(p(eos), eos is the argmax) at the last position of each reply that ends with eos, teacher-forced."""
    out = []
    for prompt, reply in zip(prompts, replies):
        if not reply or reply[-1] != eos:
            continue
        ids = torch.tensor(prompt + reply[:-1])[None]
        p = model(ids)[0][0, -1].float().softmax(-1)
        out.append((float(p[eos]), int(p.argmax()) == eos))
    return out


def main(deltas):
    torch.set_num_threads(2)
    teacher, ckpt = load_model(BASE)
    eos, bos = ckpt["hf_config"]["eos_token_id"], ckpt["hf_config"]["bos_token_id"]
    tok = HFTokenizer.load(text=ckpt["tokenizer_json"], name="the checkpoint's tokenizer")
    questions = json.load(open("data/chat_questions.json"))
    prompts = chat_prompts(tok, ckpt["chat_template"], questions, bos, eos)
    models = [("teacher", teacher)] + [(d, load_with_delta(BASE, d)[0]) for d in deltas]
    report = {}
    with torch.inference_mode():
        for m in (m for _, m in models):
            m.eval().requires_grad_(False)
        teacher_replies = greedy_replies(teacher, prompts, eos)
        for name, model in models:
            ends = end_probabilities(model, prompts, teacher_replies, eos)
            own = teacher_replies if model is teacher else greedy_replies(model, prompts, eos)
            report[name] = {"teacher_ends": len(ends), "median_p_eos": statistics.median(p for p, _ in ends),
                            "eos_argmax": sum(top for _, top in ends),
                            "own_answers_ending": sum(bool(r) and r[-1] == eos for r in own)}
            print(name, report[name], flush=True)
    return report


if __name__ == "__main__":
    json.dump(main(sys.argv[1:]), sys.stdout, indent=1)
    print()
