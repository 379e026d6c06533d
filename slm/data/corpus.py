"""The embedded default corpus: procedurally generated short children's stories.

Every test and the demo train on this, so it must be deterministic (same seed ->
byte-identical file), fast, and *learnable*: characters keep their names and
pronouns through a story, events follow a setup -> problem -> attempts -> resolution
arc, and the vocabulary is a few hundred words, so a 100k-parameter model can get
well below the unigram entropy and its samples read like stories.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from slm.core.paths import partial_file

MIN_WORDS, MAX_WORDS = 80, 250

GIRLS = ["Lily", "Mia", "Sara", "Emma", "Zoe", "Anna", "Lucy", "Ella", "Nora", "Ruby", "Ivy", "Maya",
         "Rosa", "Kate", "Amy", "Hana", "Lena", "Tara", "Nina", "Olive"]
BOYS = ["Tom", "Ben", "Max", "Leo", "Sam", "Jack", "Finn", "Noah", "Omar", "Theo", "Eli", "Hugo",
        "Kai", "Luke", "Ravi", "Timmy", "Owen", "Jake", "Milo", "Dan"]
ANIMALS = ["cat", "dog", "rabbit", "bear", "fox", "bird", "duck", "frog", "mouse", "owl", "puppy",
           "kitten", "turtle", "squirrel", "pig", "lamb", "goat", "horse", "lion", "monkey"]
ANIMAL_NAMES = ["Spot", "Fluffy", "Bubbles", "Pip", "Coco", "Whiskers", "Daisy", "Rex", "Sunny",
                "Buttons", "Pepper", "Ziggy", "Honey", "Biscuit", "Tiny", "Shadow"]
TRAITS = ["kind", "brave", "shy", "curious", "happy", "clever", "silly", "gentle", "busy", "quiet",
          "friendly", "playful", "careful", "proud", "lazy", "grumpy"]
PLACES = [("park", "in"), ("forest", "in"), ("beach", "at"), ("garden", "in"), ("farm", "on"),
          ("village", "in"), ("river", "by"), ("hill", "on"), ("school", "at"), ("kitchen", "in"),
          ("meadow", "in"), ("lake", "by"), ("zoo", "at"), ("castle", "in"), ("market", "at"),
          ("playground", "at"), ("pond", "by"), ("cave", "in"), ("library", "in"), ("town", "in")]
OBJECTS = ["ball", "kite", "hat", "box", "book", "apple", "shell", "key", "boat", "drum", "cup",
           "toy car", "doll", "blanket", "cake", "flower", "rock", "stick", "bucket", "crayon",
           "map", "bell", "sock", "spoon", "robot", "balloon", "basket", "feather", "lamp", "cookie"]
COLORS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "white", "black", "brown",
          "gold", "silver"]
SIZES = ["big", "little", "tiny", "huge", "small", "shiny", "soft", "old", "new", "round"]
TIMES = ["Once upon a time", "One day", "One sunny morning", "Long ago", "One rainy afternoon",
         "One cold winter day", "Early one morning", "One warm summer evening", "Last spring",
         "One windy day"]
FEELINGS = ["happy", "sad", "scared", "excited", "tired", "angry", "surprised", "worried", "proud",
            "lonely"]
FOODS = ["bread", "soup", "berries", "carrots", "pie", "honey", "cheese", "milk", "rice", "grapes",
         "pancakes", "nuts"]
GAMES = ["hide and seek", "tag", "catch", "a race", "a guessing game", "jump rope"]
WEATHER = ["the sun was bright", "the wind was strong", "it started to rain", "the sky was gray",
           "snow fell softly", "the clouds were fluffy", "a rainbow came out", "the stars came out"]
MORALS = ["it is good to share", "friends help each other", "being kind makes everyone happy",
          "you should always tell the truth", "it is okay to ask for help", "being brave is not easy "
          "but it is worth it", "patience is important", "everyone is good at something",
          "it is fun to try new things", "you should listen to your friends"]


@dataclass
class Character:
    """A story's character: name, kind, pronouns and trait."""
    name: str
    kind: str  # "girl", "boy", or an animal word
    subj: str  # he / she / it
    obj: str  # him / her / it
    poss: str  # his / her / its
    trait: str

    @property
    def intro(self) -> str:
        """'a brave girl named Lily' or 'a curious fox named Pip'."""
        article = "an" if self.trait[0] in "aeiou" else "a"
        return f"{article} {self.trait} {self.kind} named {self.name}"


def _character(rng: random.Random, taken: set[str]) -> Character:
    """Draw a character whose name is not in `taken` (a girl, a boy or a named animal), and add its name to `taken`."""
    roll = rng.random()
    if roll < 0.4:
        pool, kind, pronouns = GIRLS, "girl", ("she", "her", "her")
    elif roll < 0.8:
        pool, kind, pronouns = BOYS, "boy", ("he", "him", "his")
    else:
        pool, kind = ANIMAL_NAMES, rng.choice(ANIMALS)
        pronouns = rng.choice([("she", "her", "her"), ("he", "him", "his")])
    name = rng.choice([n for n in pool if n not in taken])
    taken.add(name)
    return Character(name, kind, *pronouns, rng.choice(TRAITS))


def _thing(rng: random.Random) -> str:
    """Draw an object with a colour or size word before it (e.g. 'red kite')."""
    adj = rng.choice(COLORS) if rng.random() < 0.5 else rng.choice(SIZES)
    return f"{adj} {rng.choice(OBJECTS)}"


def _cap(s: str) -> str:
    """Return `s` with its first letter capitalised."""
    return s[0].upper() + s[1:]


class _Story:
    """One story's state: its cast, place and prized object, and the sentences so far."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        taken: set[str] = set()
        self.hero = _character(rng, taken)
        self.friend = _character(rng, taken)
        self.place, self.prep = rng.choice(PLACES)
        self.thing = _thing(rng)
        self.sentences: list[str] = []

    def say(self, *options: str) -> None:
        """Add one of `options`, drawn at random, as the story's next sentence."""
        self.sentences.append(self.rng.choice(options))

    def words(self) -> int:
        """Return the number of words of the sentences so far."""
        return sum(len(s.split()) for s in self.sentences)

    def text(self) -> str:
        """Return the story so far: its sentences joined by spaces."""
        return " ".join(self.sentences)

    # --- story parts -------------------------------------------------------------------------
    def opening(self) -> None:
        """Add the opening: the hero and where they live, their prized object, their friend."""
        h, r = self.hero, self.rng
        self.say(f"{r.choice(TIMES)}, there was {h.intro}.",
                 f"{r.choice(TIMES)}, {h.intro} lived {self.prep} a {self.place}.",
                 f"{_cap(h.intro)} lived near a {self.place}.")
        self.say(f"{_cap(h.subj)} had a {self.thing} that {h.subj} loved very much.",
                 f"{h.name} loved {h.poss} {self.thing} more than anything.",
                 f"Every day, {h.name} played with {h.poss} {self.thing}.")
        self.say(f"{_cap(h.poss)} best friend was {self.friend.intro}.",
                 f"{h.name} had a friend, {self.friend.intro}.",
                 f"{h.name} often played with {self.friend.intro}.")

    def problem(self) -> None:
        """Add the problem (the object lost, a tree too high, food lacking or a fight over the object); set `goal`."""
        h, f, r = self.hero, self.friend, self.rng
        kind = r.randrange(4)
        if kind == 0:
            self.say(f"One day, {h.name} went to the {self.place} and lost {h.poss} {self.thing}.",
                     f"But when {h.subj} came back from the {self.place}, the {self.thing} was gone.")
            self.say(f"{h.name} felt {r.choice(['sad', 'worried', 'scared'])}.",
                     f"{h.name} looked everywhere, but {h.subj} could not find it.")
            self.say(f'"Where is my {self.thing}?" {h.name} cried.',
                     f'"Oh no! My {self.thing} is lost," said {h.name}.')
            self.goal = "find"
        elif kind == 1:
            self.say(f"One day, {h.name} wanted to climb the tall tree {self.prep} the {self.place}.",
                     f"One day, {h.name} saw a {r.choice(SIZES)} tree {self.prep} the {self.place}.")
            self.say(f"{_cap(h.subj)} wanted to see what was at the top, but {h.subj} was {r.choice(FEELINGS)}.",
                     f"{_cap(h.subj)} tried to climb it, but the tree was too high.")
            self.say(f'"I can not do it," said {h.name}.', f'"It is too hard," {h.name} said.')
            self.goal = "climb"
        elif kind == 2:
            food = r.choice(FOODS)
            self.food = food
            self.say(f"One day, {h.name} was very hungry, but there was no {food} left.",
                     f"One morning, {h.name} wanted to make {food} for {h.poss} friends.")
            self.say(f"{_cap(h.subj)} did not know what to do.", f"{_cap(h.subj)} felt {r.choice(FEELINGS)}.")
            self.say(f'"I need some {food}," said {h.name}.', f'"How can I get {food}?" {h.name} asked.')
            self.goal = "food"
        else:
            self.say(f"One day, {h.name} and {f.name} had a fight about the {self.thing}.",
                     f"One day, {f.name} wanted to play with the {self.thing}, but {h.name} said no.")
            self.say(f'"It is mine!" shouted {h.name}.', f'"You can not have it," said {h.name}.')
            self.say(f"{f.name} was {r.choice(['sad', 'angry', 'lonely'])} and walked away.",
                     f"{f.name} began to cry.")
            self.goal = "share"

    def attempt(self) -> None:
        """Add an attempt: the hero goes somewhere, meets or sees something, and asks for help or tries again."""
        h, f, r = self.hero, self.friend, self.rng
        place, _ = r.choice(PLACES)
        self.say(f"{h.name} went to the {place}.", f"Then {h.name} walked to the {place}.",
                 f"{h.name} ran to the {place} as fast as {h.subj} could.",
                 f"Outside, {r.choice(WEATHER)}.")
        self.say(f"There {h.subj} met a {r.choice(TRAITS)} {r.choice(ANIMALS)}.",
                 f"{_cap(h.subj)} saw a {_thing(r)} under a {r.choice(['tree', 'bench', 'rock', 'bush'])}.",
                 f"{_cap(h.subj)} looked behind the {r.choice(OBJECTS)}, but it was not there.",
                 f"{h.name} and {f.name} played {r.choice(GAMES)} for a while.")
        self.say(f'"Can you help me?" asked {h.name}.', f'"Have you seen my {self.thing}?" asked {h.name}.',
                 f'"Let us try again," said {f.name}.', f"{h.name} thought and thought.",
                 f'"Do not give up," said {f.name} with a smile.')

    def resolution(self) -> None:
        """Add the resolution of `goal`: the object found, the tree climbed, the food found or the object shared."""
        h, f, r = self.hero, self.friend, self.rng
        if self.goal == "find":
            self.say(f"At last, {f.name} found the {self.thing} {self.prep} the {self.place}.",
                     f"Then {h.name} saw something {r.choice(COLORS)} near the {self.place}. It was the {self.thing}!")
            self.say(f'"Thank you, {f.name}!" said {h.name}.', f"{h.name} hugged {h.poss} {self.thing}.")
        elif self.goal == "climb":
            self.say(f"{f.name} held the tree and helped {h.name} climb.",
                     f"{h.name} took a deep breath and tried one more time.")
            self.say(f"At the top, {h.subj} could see the whole {self.place}.",
                     f"Soon {h.name} was at the top. {_cap(h.subj)} was so {r.choice(['happy', 'proud'])}!")
        elif self.goal == "food":
            self.say(f"{f.name} came with a basket of {self.food}.",
                     f"{f.name} showed {h.name} where to find {self.food} {self.prep} the {self.place}.")
            self.say(f"They ate the {self.food} together.", f'"This {self.food} is yummy!" said {h.name}.')
        else:
            self.say(f"{h.name} felt bad. {_cap(h.subj)} went to {f.name} and said sorry.",
                     f"{h.name} saw that {f.name} was sad, so {h.subj} gave {f.name} the {self.thing}.")
            self.say(f"They played with the {self.thing} together.", f'"Let us share," said {h.name}.')

    def ending(self) -> None:
        """Add the ending: how the day ended, then a moral, "The end." or a memory of the place."""
        h, f, r = self.hero, self.friend, self.rng
        self.say(f"From that day on, {h.name} and {f.name} were best friends.",
                 f"{h.name} and {f.name} smiled and went home.", "That night, everyone slept well.",
                 f"{h.name} was very {r.choice(['happy', 'proud', 'glad'])}.")
        self.say(f"{h.name} learned that {r.choice(MORALS)}.", "The end.",
                 f"And {h.name} never forgot that day {self.prep} the {self.place}.")


def story(rng: random.Random) -> str:
    """Return one story of MIN_WORDS..MAX_WORDS words drawn from `rng`."""
    while True:
        s = _Story(rng)
        s.opening()
        s.problem()
        for _ in range(rng.randint(1, 4)):
            s.attempt()
        while s.words() < MIN_WORDS - 20:
            s.attempt()
        s.resolution()
        s.ending()
        if MIN_WORDS <= s.words() <= MAX_WORDS:
            return s.text()


def stories(num_docs: int, seed: int = 0) -> Iterator[str]:
    """Yield `num_docs` stories; the same seed always gives the same stories."""
    rng = random.Random(seed)
    for _ in range(num_docs):
        yield story(rng)


def write_corpus(out: Path, num_docs: int, seed: int = 0, field: str = "story") -> int:
    """Write `num_docs` stories as JSON lines to `out` (atomically); returns bytes written."""
    with partial_file(out) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for text in stories(num_docs, seed):
            f.write(json.dumps({field: text}, ensure_ascii=False) + "\n")
    return out.stat().st_size
