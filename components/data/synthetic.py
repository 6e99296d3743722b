"""Synthetic conversations that test memory: facts stated early, asked about many turns later.

Deterministic from a seed. ``memory_conversation`` gives the turns as ``(role, text)``;
``write_text_conversations`` writes text-only multi-turn JSON for curriculum and memory
tests (scripts/make_sample_data.py speaks the user turns of the same conversations).
"""

import json
import random
from pathlib import Path
from typing import List, Tuple, Union

# (statement, question, answer), filled from the value lists below
FACTS = [
    ("My sister is called {}.", "What is my sister called?", "Your sister is called {}.", ["Alice", "Maria", "Nora", "Ines"]),
    ("I live in {}.", "Where do I live?", "You live in {}.", ["Lisbon", "Oslo", "Kyoto", "Lima"]),
    ("My favorite color is {}.", "What is my favorite color?", "Your favorite color is {}.", ["green", "blue", "orange", "red"]),
    ("My dog's name is {}.", "What is my dog's name?", "Your dog's name is {}.", ["Rex", "Biscuit", "Luna", "Pepper"]),
    ("I work as a {}.", "What do I do for work?", "You work as a {}.", ["baker", "pilot", "nurse", "teacher"]),
    ("My lucky number is {}.", "What is my lucky number?", "Your lucky number is {}.", ["seven", "twelve", "three", "forty"]),
]
SMALL_TALK = [
    ("How are you today?", "I am doing well, thank you for asking."),
    ("Can you tell me a fun fact?", "Octopuses have three hearts."),
    ("What should I cook tonight?", "A simple vegetable soup would be nice."),
    ("Recommend a book to me.", "You might enjoy a short collection of science fiction stories."),
    ("Is it a good day for a walk?", "A short walk is good on almost any day."),
    ("How do I make tea?", "Boil water, pour it over the leaves, and wait three minutes."),
    ("Tell me something about the moon.", "The moon always shows the same face to the earth."),
    ("What is a good name for a cat?", "Whiskers is a classic choice."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("Can you help me relax?", "Take a slow breath in, and let it out even more slowly."),
]


def memory_conversation(seed: int, num_facts: int = 3, small_talk_turns: int = 10) -> List[Tuple[str, str]]:
    """``[(role, text)]``: the user states ``num_facts`` facts, chats for ``small_talk_turns``
    exchanges, then asks about every fact; the assistant's answers recall them."""
    rng = random.Random(seed)
    facts = [(s, q, a, rng.choice(values)) for s, q, a, values in rng.sample(FACTS, num_facts)]
    turns: List[Tuple[str, str]] = []
    for statement, _, _, value in facts:
        turns += [("user", statement.format(value)), ("assistant", "Got it, I will remember that.")]
    for _ in range(small_talk_turns):
        question, answer = rng.choice(SMALL_TALK)
        turns += [("user", question), ("assistant", answer)]
    for _, question, answer, value in facts:
        turns += [("user", question), ("assistant", answer.format(value))]
    return turns


def write_text_conversations(
    path: Union[str, Path], count: int, small_talk_turns: int = 10, num_facts: int = 3, seed: int = 0
) -> None:
    """Writes ``count`` text-only memory conversations as multi-turn Llama-Omni JSON."""
    records = []
    for i in range(count):
        turns = memory_conversation(seed + i, num_facts, small_talk_turns)
        conversation = [{"from": "human" if role == "user" else "gpt", "text": text} for role, text in turns]
        records.append({"id": f"memory-{seed + i}", "conversation": conversation})
    Path(path).write_text(json.dumps(records, indent=1))
