#!/usr/bin/env python
"""Write data/chat_sample/bakery_chats.jsonl: multi-turn conversations with the assistant of a made-up bakery,
in the chat "messages" format (a system prompt, 2 to 4 user turns, follow-ups that refer to earlier turns).

The facts (prices, opening hours) exist nowhere else, so a base model cannot know them and a tuned one has to
learn them from the assistant turns; held-out conversations combine the same facts in new ways. Seeded: the
same file on every run.

  python benchmarks/bakery_chats.py            # rewrites data/chat_sample/bakery_chats.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "data" / "chat_sample" / "bakery_chats.jsonl"
SYSTEM = "You are the assistant of Harbor Lane Bakery. Answer in one short sentence."
PRICES = {"croissant": 250, "sourdough loaf": 600, "cinnamon roll": 350, "baguette": 300, "blueberry muffin": 275,
          "rye loaf": 550, "apple tart": 425, "pretzel": 200}
PLURAL = {"sourdough loaf": "sourdough loaves", "rye loaf": "rye loaves"}
HOURS = {"Monday": (7, 18), "Tuesday": (7, 18), "Wednesday": (7, 18), "Thursday": (7, 18), "Friday": (7, 18),
         "Saturday": (8, 16), "Sunday": None}


def money(cents: int) -> str:
    return f"${cents // 100}.{cents % 100:02d}"


def clock(hour: int) -> str:
    return f"{hour} am" if hour < 12 else f"{hour - 12 if hour > 12 else 12} pm"


def price_turns(rng: random.Random) -> list[tuple[str, str]]:
    item = rng.choice(sorted(PRICES))
    ask = rng.choice(["How much is a {}?", "What does a {} cost?", "What's the price of a {}?"]).format(item)
    turns = [(ask, f"A {item} costs {money(PRICES[item])}.")]
    if rng.random() < 0.7:
        budget = rng.choice([5, 10, 12, 15, 20])
        count = budget * 100 // PRICES[item]
        name = item if count == 1 else PLURAL.get(item, item + "s")
        turns.append((rng.choice(["How many can I buy with ${}?", "And with ${}, how many could I get?"]).format(budget),
                      f"With ${budget} you can buy {count} {name}."))
    return turns


def hours_turns(rng: random.Random) -> list[tuple[str, str]]:
    day = rng.choice(sorted(HOURS))
    ask = rng.choice(["When do you open on {}?", "What time do you open on {}?", "Are you open on {}?"]).format(day)
    if HOURS[day] is None:
        return [(ask, "We are closed on Sundays.")]
    opens, closes = HOURS[day]
    turns = [(ask, f"On {day} we open at {clock(opens)}.")]
    if rng.random() < 0.7:
        turns.append((rng.choice(["And when do you close?", "Until when?"]), f"On {day} we close at {clock(closes)}."))
    return turns


def conversation(rng: random.Random) -> dict:
    turns: list[tuple[str, str]] = []
    if rng.random() < 0.4:
        turns.append((rng.choice(["Hi!", "Hello there.", "Good morning!"]), "Hello! Welcome to Harbor Lane Bakery."))
    for _ in range(rng.choice([1, 1, 2])):
        turns += (price_turns if rng.random() < 0.6 else hours_turns)(rng)
    if rng.random() < 0.3:
        turns.append((rng.choice(["Thanks!", "Thank you."]), "You're welcome, see you soon!"))
    messages = [{"role": "system", "content": SYSTEM}]
    for question, answer in turns[:8]:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def main() -> None:
    rng = random.Random(29)
    rows, seen = [], set()
    while len(rows) < 240:  # distinct conversations: a held-out one never repeats a training one
        row = conversation(rng)
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} conversations to {OUT}")


if __name__ == "__main__":
    main()
