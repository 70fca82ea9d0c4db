"""Writes data/sft-tiny.jsonl: a small synthetic chat task for fine-tuning demos and tests.

    python data/make_sft_tiny.py            # deterministic: the same file every time

Each line is {"messages": [{"role", "content"}, ...]}: a user asks for one of
a few mechanical tasks (adding two numbers, sorting or reversing a list of
words, counting words, upper-casing a word) and the assistant answers in a
fixed format. Some conversations start with a system message, some have two
turns. The answers follow rules a small model can pick up from a few hundred
examples, so the validation loss visibly falls within minutes on a CPU.
"""

from __future__ import annotations

import json
import os
import random

WORDS = ("apple banana cherry grape lemon mango melon olive peach pear plum lime kiwi fig date "
         "river stone cloud storm field house table chair window garden forest mountain ocean "
         "red blue green yellow purple orange silver golden quiet happy").split()
SYSTEMS = ("You are a precise assistant. Answer in one line.",
           "You follow instructions exactly.")


def task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    words = rng.sample(WORDS, rng.randrange(3, 6))
    listed = ", ".join(words)
    if kind == 1:
        return f"Sort these words alphabetically: {listed}", "Sorted: " + ", ".join(sorted(words)) + "."
    if kind == 2:
        return f"Reverse the order of these words: {listed}", "Reversed: " + ", ".join(reversed(words)) + "."
    if kind == 3:
        return f"How many words are in this list: {listed}?", f"There are {len(words)} words."
    word = rng.choice(WORDS)
    return f"Write the word {word} in capital letters.", f"{word.upper()}"


def conversation(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    for _ in range(2 if rng.random() < 0.25 else 1):
        question, answer = task(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def main(path: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sft-tiny.jsonl"),
         n: int = 600, seed: int = 0) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps(conversation(rng)) + "\n")
    return path


if __name__ == "__main__":
    print(main())
