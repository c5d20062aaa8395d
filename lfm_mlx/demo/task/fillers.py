"""The task's fillers: word, name, city, topic ... pools (training and held out, most training words made up) and the slot makers."""

from __future__ import annotations

import random
from typing import Callable


_WORDS = (
    "amber apple arrow atlas aurora basil birch blaze bloom breeze canyon cedar cobalt comet coral delta "
    "dune ember falcon fern flint frost garnet glacier harbor hazel indigo iris jade juniper lagoon lark "
    "laurel lotus lunar maple meadow mesa mint nova ocean olive onyx orbit pearl pebble pine pixel plum "
    "prism quartz raven reef ridge river ruby sage slate solar spruce summit tide timber topaz tulip "
    "valley willow"
).split()
_HELD_WORDS = (
    "acorn bramble cinder dahlia fjord grove heron inlet kestrel lichen marsh nectar orchid quill rowan "
    "sorrel thistle umber wren yarrow"
).split()
_NAMES = "alice bob carol dave erin frank grace heidi ivan judy mallory niaj oscar peggy rupert sybil trent victor wendy".split()
_HELD_NAMES = "quinn xavier yusuf zelda".split()
_CITIES = (
    "Paris|Berlin|Madrid|Rome|Vienna|Prague|Dublin|Warsaw|Athens|Zurich|Munich|Seattle|Boston|Denver|Austin|"
    "Chicago|Toronto|Montreal|Tokyo|Osaka|Seoul|Sydney|Cairo|Nairobi|Lima|Bogota|Mumbai|Delhi|Jakarta|Hanoi"
).split("|")
_HELD_CITIES = "Lisbon|Oslo|Helsinki|Tallinn|Porto|Quito|Kyoto|Perth|Accra|Tbilisi".split("|")
_TOPICS = (
    "rust async tutorial|best hiking boots|sourdough starter tips|python type hints|cheap flights to rome|"
    "electric bike reviews|how tides work|used camera prices|jazz history|beginner chess openings|"
    "vegan lasagna recipe|linux kernel news|home espresso guide|marathon training plan|kubernetes basics|"
    "solar panel costs|learn spanish fast|mechanical keyboard switches|bird watching gear|git rebase guide"
).split("|")
_HELD_TOPICS = (
    "ocean kayaking safety|fermented hot sauce|vintage synth repair|moss garden ideas|"
    "glacier hiking permits|bonsai pruning basics|retro console emulation|urban beekeeping"
).split("|")
_LABELS = "Sign in|Next|Submit|Accept cookies|Download|Continue|Search|Show more|Add to cart|Log out".split("|")
_HELD_LABELS = "Checkout|Archive|Subscribe|Load comments".split("|")
_CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "clear", "stormy"]
_DATES = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "tomorrow", "june 3", "may 12"]
_TLDS = ["com", "org", "io", "dev", "net"]
_EXTS = ["txt", "md", "py", "json", "log", "yaml", "csv"]


# A filler pool: "train" (task rows, dev suite), "held" (held-out suites), or "known" (the pre-training
# surface: every word a base has met, the held-out ones included, as a real base knows every word;
# no task row and no held-out prompt comes from it).


def _splice(rng: random.Random, sources: list[str]) -> str:
    """A word-like filler spliced from two source words (`cedar` + `lotus` -> `cetus`), never a real one."""
    while True:
        a, b = rng.sample(sources, 2)
        word = a[:rng.randint(2, len(a) - 1)] + b[rng.randint(1, len(b) - 2):]
        if 4 <= len(word) <= 9 and word not in _REAL_WORDS:
            return word


_REAL_WORDS = frozenset(_WORDS + _HELD_WORDS)


MADE_UP_SHARE = 0.7  # of word, name and city fillers in the train and known pools
# Where a made-up filler is spliced from: the task's rows from training words only (no held-out word
# ever shapes a task row), the pre-training surface from every word it knows.
_SPLICE_SOURCES = {"train": _WORDS, "known": _WORDS + _HELD_WORDS}


def _pick(rng: random.Random, train: list, held: list, pool: str, shape: Callable[[str], str] | None = None):
    """A filler from `pool`. With `shape`, train / known fillers are usually a made-up word, shaped."""
    if pool == "held":
        return rng.choice(held)
    if shape is not None and rng.random() < MADE_UP_SHARE:
        # A fresh word each time, so a value is almost never seen twice and only copying pays (against
        # a fixed pool of 1,500 task words: the same held-out mean within a point, docs/benchmarks.md).
        return shape(_splice(rng, _SPLICE_SOURCES[pool]))
    return rng.choice(train + held if pool == "known" else train)


def _word(rng: random.Random, pool: str) -> str:
    return _pick(rng, _WORDS, _HELD_WORDS, pool, shape=str)


def _name(rng: random.Random, pool: str) -> str:
    return _pick(rng, _NAMES, _HELD_NAMES, pool, shape=str)


def _city(rng: random.Random, pool: str) -> str:
    return _pick(rng, _CITIES, _HELD_CITIES, pool, shape=str.capitalize)


def _topic(rng: random.Random, pool: str) -> str:
    if pool == "train" and rng.random() < MADE_UP_SHARE:
        # Most task topics are two or three free words: with a fixed last word ("tips", "news") only, that
        # word was learned as a guess and held-out topics came back as "glacier hiking news".
        return " ".join(_word(rng, pool) for _ in range(rng.randint(2, 3)))
    if pool != "held" and rng.random() < MADE_UP_SHARE:  # the pre-training surface's only made-up shape
        return f"{_word(rng, pool)} {_word(rng, pool)} {rng.choice(['tips', 'guide', 'basics', 'reviews', 'news'])}"
    return _pick(rng, _TOPICS, _HELD_TOPICS, pool)


def _tagged(rng: random.Random, pool: str, tags: list[str]) -> str:
    """A word and a tag (`acorn lunch`); task rows often swap the tag for a free word, so that the tag
    is copied from the request rather than guessed from the few (held-out `fjord plan` came back as
    `fjord update`)."""
    word = _word(rng, pool)
    return f"{word} {_word(rng, pool) if pool == 'train' and rng.random() < 0.5 else rng.choice(tags)}"


def _dir(rng: random.Random, pool: str) -> str:
    return rng.choice(["/home/user/{w}", "src/{w}", "~/{w}", "/var/{w}", "docs/{w}"]).format(w=_word(rng, pool))


def _file(rng: random.Random, pool: str) -> str:
    return f"{_dir(rng, pool)}/{_word(rng, pool)}.{rng.choice(_EXTS)}"


def _site(rng: random.Random, pool: str) -> str:
    form = rng.choice(["{a}.{t}", "{a}-{b}.{t}", "{a}.{t}/{b}", "docs.{a}.{t}"])
    return form.format(a=_word(rng, pool), b=_word(rng, pool), t=rng.choice(_TLDS))


def _command(rng: random.Random, pool: str) -> str:
    form = rng.choice([
        "ls -la {d}", "du -sh {d}", "tail -n {n} {f}", "grep -rn {w} {d}", "python {w}.py", "pip install {w}",
        "wc -l {f}", "cat {f}", "git log --oneline -n {n}", "make {w}", "mkdir -p {d}", "git checkout {w}",
    ])
    return form.format(d=_dir(rng, pool), f=_file(rng, pool), w=_word(rng, pool), n=rng.randint(2, 50))


def _howto(rng: random.Random, pool: str) -> dict:
    """A task described in words and the command that does it (for no-tool how-to answers)."""
    d, f, w = _dir(rng, pool), _file(rng, pool), _word(rng, pool)
    task, command = rng.choice([
        (f"list the files in {d}", f"ls -la {d}"), (f"count the lines of {f}", f"wc -l {f}"),
        (f"see how big {d} is", f"du -sh {d}"), (f"install the {w} package", f"pip install {w}"),
        (f"find {w} inside {d}", f"grep -rn {w} {d}"), (f"see the end of {f}", f"tail -n 20 {f}"),
    ])
    return {"task": task, "command": command, "tool_name": command.split()[0]}


def _title(rng: random.Random, pool: str) -> str:
    return f"{_word(rng, pool).capitalize()} {rng.choice(['Docs', 'Home', 'Blog', 'Wiki', 'Store', 'News'])}"


# Slot makers: each returns a dict of slot values, its words drawn from a pool ("train", "held", "known").
SLOT_MAKERS: dict[str, Callable[[random.Random, str], dict]] = {  # (rng, pool) -> slots
    "site": lambda r, h: {"site": _site(r, h), "title": _title(r, h)},
    "query": lambda r, h: {"query": _topic(r, h), "title": _title(r, h), "site": _site(r, h),
                           "title2": _title(r, h)},
    "click": lambda r, h: {"label": _pick(r, _LABELS, _HELD_LABELS, h), "ref": f"e{r.randint(2, 99)}",
                           "title": _title(r, h)},
    "command": lambda r, h: {"command": _command(r, h), "code": r.choice([0, 0, 1]),
                             "out": f"{_word(r, h)} {_word(r, h)} {r.randint(3, 900)}"},
    "file": lambda r, h: {"path": _file(r, h), "text": f"{_word(r, h)} {_word(r, h)} {_word(r, h)}"},
    "search": lambda r, h: {"pattern": _word(r, h), "dir": _dir(r, h), "hit": _file(r, h), "line": r.randint(2, 400)},
    "write": lambda r, h: {"path": _file(r, h), "content": f"{_word(r, h)} {_word(r, h)} {_word(r, h)}",
                           "bytes": r.randint(12, 4000)},
    "weather": lambda r, h: {"city": _city(r, h), "temp": r.randint(-9, 35),
                             "cond": r.choice(_CONDITIONS)},
    "event": lambda r, h: {"event": _tagged(r, h, ['sync', 'review', 'lunch', 'call', 'standup']),
                           "date": r.choice(_DATES), "eid": f"evt{r.randint(100, 999)}"},
    "email": lambda r, h: {"to": f"{_name(r, h)}@{_word(r, h)}.com",
                           "subject": _tagged(r, h, ['update', 'notes', 'plan', 'invoice']),
                           "mid": f"m{r.randint(1000, 9999)}"},
    "howto": _howto,
    # pretrain surface
    "song": lambda r, h: {"song": f"{_word(r, h)} {_word(r, h)}".title(), "artist": _name(r, h).title(),
                          "minutes": r.randint(2, 7)},
    "translate": lambda r, h: {"text": f"{_word(r, h)} {_word(r, h)}", "language": r.choice(["French", "German", "Spanish", "Italian", "Dutch"]),
                               "translation": f"le {_word(r, h)}"},
    "stock": lambda r, h: {"symbol": _word(r, h)[:4].upper(), "price": round(r.uniform(5, 900), 2)},
    "recipe": lambda r, h: {"dish": f"{_word(r, h)} {r.choice(['soup', 'curry', 'salad', 'pie', 'stew'])}",
                            "max_minutes": r.choice([15, 20, 30, 45, 60]), "steps": r.randint(3, 12)},
    "timer": lambda r, h: {"minutes": r.randint(1, 90), "label": f"{_word(r, h)} {r.choice(['tea', 'pasta', 'break', 'laundry'])}"},
    "table": lambda r, h: {"restaurant": f"{_word(r, h).title()} {r.choice(['Grill', 'Bistro', 'Kitchen', 'Diner'])}",
                           "people": r.randint(1, 12), "time": f"{r.randint(5, 9)}pm"},
    "money": lambda r, h: {"amount": r.choice([5, 12.5, 20, 99.9, 150, 1000]), "source": r.choice(["USD", "EUR", "GBP"]),
                           "target": r.choice(["JPY", "CHF", "CAD", "AUD"]), "converted": round(r.uniform(5, 9000), 2)},
    "room": lambda r, h: {"room": r.choice(["kitchen", "bedroom", "office", "hallway", "garage"]) + (f" {_word(r, h)}" if r.random() < 0.5 else "")},
    "word": lambda r, h: {"word": _word(r, h), "meaning": f"a kind of {_word(r, h)}"},
    "person": lambda r, h: {"person": _name(r, h).title()},
    "package": lambda r, h: {"tracking": f"1Z{r.randint(10000, 99999)}{_word(r, h)[:2].upper()}", "where": _city(r, h)},
    "news": lambda r, h: {"topic": _topic(r, h).split()[-1], "count": r.randint(2, 9), "headline": _title(r, h)},
    "todo": lambda r, h: {"todo": f"{r.choice(['buy', 'fix', 'call', 'clean'])} the {_word(r, h)}", "priority": r.choice(["low", "medium", "high"])},
}

