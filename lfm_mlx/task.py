"""A synthetic tool-use task for the demo: two tool surfaces, a seeded row generator, held-out suites.

The `task` surface is Hermes-style (browser navigate / search / click, terminal, file read / search /
write, plus weather, calendar and email): the demo teaches it and evaluates it. The `pretrain`
surface is what `lfm_mlx.pretrain` gives the tiny base its general tool-call ability on: other domains
(music, translation, timers, recipes, ...) and "sibling" tools that serve the task's kinds of request
under other names (`cat_file` for `read_file`, a bare site for `https://...`). So the base knows the
call syntax and how to copy a value out of a request, but calls none of the task's tools: it starts
near zero on the task.

A prompt is an intent's phrasing (`open {site}`), inside a wrapper (terse `{p}` or colloquial `hey,
can you {p}?`), with fillers (`site` = `cedar-docs.org`). Phrasings, wrappers and word fillers each
have a training pool and a held-out pool; most training fillers are made-up words, so a model must
copy values rather than recall them. The task's training rows use training pools only. A `test`
suite case puts a training phrasing in a held-out wrapper with held-out fillers: its prompt never
occurs in task training (`check_disjoint` asserts it on the rows actually written). A `paraphrase`
case uses a held-out phrasing ("pull up {site} in the browser"). The pre-training surface uses every
phrasing and wrapper, held-out ones included, with its own tools: as a real base knows the language
before it meets your tools, the held-out suites test whether task training carries over to wording
the base knows and the task rows never show.

    python -m lfm_mlx.task OUT_DIR --rows 600 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from lfm_mlx.fsutil import atomic_write_json, atomic_write_text

# ---------------------------------------------------------------- filler pools (train, held out)

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


def _made_up_words(sources: list[str], n: int, seed: str) -> list[str]:
    """`n` distinct spliced fillers: the task rows' pool.

    Rows draw most of their words from these, so a value is rarely seen twice: with a few dozen real
    words, a tiny model learns to write its favourite training words instead of copying the request's
    (measured: held-out values answered with training ones)."""
    rng, out = random.Random(seed), set()
    while len(out) < n:
        out.add(_splice(rng, sources))
    return sorted(out)


_MADE_UP = {"train": _made_up_words(_WORDS, 1500, "train")}
MADE_UP_SHARE = 0.7  # of word, name and city fillers in the train and known pools


def _pick(rng: random.Random, train: list, held: list, pool: str, shape: Callable[[str], str] | None = None):
    """A filler from `pool`. With `shape`, train / known fillers are usually a made-up word, shaped."""
    if pool == "held":
        return rng.choice(held)
    if shape is not None and rng.random() < MADE_UP_SHARE:
        # Pre-training splices a fresh word each time, so copying is learned for any word, not for a
        # few thousand seen a hundred times each (the task keeps its fixed pool of 1,500).
        made_up = _splice(rng, _WORDS + _HELD_WORDS) if pool == "known" else rng.choice(_MADE_UP[pool])
        return shape(made_up)
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

# ---------------------------------------------------------------- wrappers (colloquial and terse)

WRAPPERS = [
    "{p}", "{p}.", "{p} pls", "{p}!", "please {p}", "hey, can you {p}?", "could you {p} for me?",
    "{p}, thanks", "i need you to {p}", "can you {p} real quick?", "ok so {p}", "hi! {p} please",
]
HELD_WRAPPERS = ["would you {p}?", "{p} when you get a sec", "yo {p}", "quick favor: {p}"]
# More ways to ask, in the task's rows only (the pre-training surface keeps WRAPPERS): with a dozen, the
# fine-tune learned those dozen and lost requests in a new frame (a held-out "would you ...?" called
# web_search with a URL). None shares a word with HELD_WRAPPERS.
TASK_WRAPPERS = WRAPPERS + [
    "{p} asap", "now {p}", "can u {p}", "go ahead and {p}", "{p}, please", "mind doing this: {p}",
    "{p} thx", "hey {p}", "{p} for me", "pls {p}", "task: {p}", "next up, {p}", "{p}?", "help me {p}",
]
# Chat and how-to prompts: the task's rows wrap them in CHAT_WRAPPERS, their held-out cases in
# HELD_CHAT_WRAPPERS. (The pre-training surface keeps its own mix: bare, or a held-out wrapper.)
CHAT_WRAPPERS = ["{p}", "{p}!", "ok {p}", "well, {p}", "{p} ;)", "hmm {p}"]
HELD_CHAT_WRAPPERS = ["oh, {p}", "{p} :)", "so... {p}", "um {p}"]

# ---------------------------------------------------------------- intents and surfaces


@dataclass(frozen=True)
class Intent:
    """One thing a user asks for: its phrasings (train, held out), the call or plain answer it gets.

    `arguments` values are format strings over the slots (a lone `{slot}` keeps the slot's type) or
    constants. A tool intent's `result` / `answer` / `contains` make its finalization turns; a plain
    intent (`tool` None) answers `answer` directly. `wrap` puts phrasings inside WRAPPERS.
    """

    name: str
    category: str
    makers: tuple[str, ...]
    phrasings: tuple[str, ...]
    held_phrasings: tuple[str, ...]
    tool: str | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    result: str = ""
    answer: str = ""
    contains: tuple[str, ...] = ()
    wrap: bool = True


@dataclass(frozen=True)
class Surface:
    name: str
    pool: str  # where its rows' fillers come from: "train" (the task) or "known" (pre-training)
    tools: dict[str, dict]
    intents: tuple[Intent, ...]
    categories: tuple[str, ...]  # suite categories, in report order


def _tool(name: str, description: str, **params: str) -> dict:
    """An OpenAI tool schema; every parameter required; `kind` is a JSON type or `enum:a,b,c`."""
    properties = {}
    for key, kind in params.items():
        properties[key] = {"type": "string", "enum": kind[5:].split(",")} if kind.startswith("enum:") else {"type": kind}
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": {"type": "object", "properties": properties,
                                                            "required": list(params)}}}


# Short descriptions and no per-parameter prose: the tool list is most of every prompt's tokens.
TASK_TOOLS = {t["function"]["name"]: t for t in [
    _tool("browser_navigate", "Open a URL in the browser.", url="string"),
    _tool("web_search", "Search the web.", query="string"),
    _tool("browser_click", "Click a page element by ref.", ref="string"),
    _tool("terminal", "Run a shell command.", command="string"),
    _tool("read_file", "Read a text file.", path="string"),
    _tool("search_files", "Search file contents.", pattern="string", path="string"),
    _tool("write_file", "Write a text file.", path="string", content="string"),
    _tool("get_weather", "Current weather of a city.", city="string"),
    _tool("create_event", "Add a calendar event.", title="string", date="string"),
    _tool("send_email", "Send an email.", to="string", subject="string"),
]}

TASK_INTENTS = (
    Intent("navigate", "browser", ("site",),
           ("open {site}", "go to {site}", "navigate to {site}", "visit {site}", "open the page {site}", "browse to {site}"),
           ("pull up {site} in the browser", "load {site}"),
           "browser_navigate", {"url": "https://{site}"},
           '{{"status": 200, "title": "{title}"}}', 'The page is open: "{title}".', ("{title}",)),
    Intent("search", "browser", ("query",),
           ("search the web for {query}", "search for {query}", "look up {query}", "google {query}", "web search {query}",
            "find results on {query}"),
           ("do a quick search on {query}", "look online for {query}"),
           "web_search", {"query": "{query}"},
           '{{"results": [{{"title": "{title}", "url": "https://{site}"}}, {{"title": "{title2}"}}]}}',
           'Top result: "{title}" at https://{site}.', ("{title}",)),
    Intent("click", "browser", ("click",),
           ("click {ref}", "click the {label} button ({ref})", "press {label}, ref {ref}", "click element {ref}",
            "hit the {label} link at {ref}"),
           ("tap on {label} which is {ref}", "select {ref}"),
           "browser_click", {"ref": "{ref}"},
           '{{"clicked": "{ref}", "page": "{title}"}}', 'Clicked {ref}; the page now shows "{title}".', ("{title}",)),
    Intent("terminal", "terminal", ("command",),
           ("run {command}", "run `{command}`", "execute {command}", "in the terminal run {command}", "$ {command}",
            "run this in the shell: {command}"),
           ("fire off {command} in a shell", "execute `{command}` for me in the terminal"),
           "terminal", {"command": "{command}"},
           '{{"exit_code": {code}, "stdout": "{out}"}}', "It exited with code {code} and printed: {out}", ("{out}",)),
    Intent("read", "file", ("file",),
           ("read {path}", "show me {path}", "open the file {path}", "print the contents of {path}", "cat the file {path}",
            "what is in {path}"),
           ("read through {path}", "dump the file {path}"),
           "read_file", {"path": "{path}"},
           '{{"content": "{text}"}}', "{path} says: {text}", ("{text}",)),
    Intent("grep", "file", ("search",),
           ("search {dir} for {pattern}", "find {pattern} in the files under {dir}", "grep {pattern} in {dir}",
            "look for {pattern} in {dir}", "which files in {dir} mention {pattern}"),
           ("scan {dir} for {pattern}", "hunt for {pattern} inside {dir}"),
           "search_files", {"pattern": "{pattern}", "path": "{dir}"},
           '{{"matches": ["{hit}:{line}"]}}', "Found {pattern} in {hit} at line {line}.", ("{hit}",)),
    Intent("write", "file", ("write",),
           ("write '{content}' to {path}", "save '{content}' in {path}", "create {path} with '{content}'",
            "put '{content}' into {path}", "write the file {path} containing '{content}'"),
           ("store '{content}' as {path}", "make a file {path} that says '{content}'"),
           "write_file", {"path": "{path}", "content": "{content}"},
           '{{"ok": true, "bytes_written": {bytes}}}', "Saved {bytes} bytes to {path}.", ("{bytes}",)),
    Intent("weather", "apps", ("weather",),
           ("weather in {city}", "what's the weather in {city}", "get the weather for {city}", "is it cold in {city}",
            "check the weather in {city}", "forecast for {city}"),
           ("how's the sky over {city}", "tell me the weather conditions in {city}"),
           "get_weather", {"city": "{city}"},
           '{{"city": "{city}", "temp_c": {temp}, "conditions": "{cond}"}}', "It is {temp} C and {cond} in {city}.",
           ("{temp}", "{cond}")),
    Intent("event", "apps", ("event",),
           ("add {event} on {date} to my calendar", "schedule {event} for {date}", "create an event {event} on {date}",
            "put {event} on the calendar for {date}", "book {event} {date}"),
           ("block {date} for {event}", "pencil in {event} on {date}"),
           "create_event", {"title": "{event}", "date": "{date}"},
           '{{"id": "{eid}", "status": "created"}}', 'Added "{event}" on {date} (id {eid}).', ("{eid}",)),
    Intent("email", "apps", ("email",),
           ("email {to} about {subject}", "send an email to {to} with subject {subject}", "write {to} an email: {subject}",
            "mail {to} re {subject}", "send {to} a note about {subject}"),
           ("drop {to} a line about {subject}", "shoot an email over to {to} titled {subject}"),
           "send_email", {"to": "{to}", "subject": "{subject}"},
           '{{"status": "sent", "message_id": "{mid}"}}', "Sent to {to} (message {mid}).", ("{mid}",)),
    Intent("howto", "no_tool", ("howto",),
           ("how do I {task} myself?", "which command would I use to {task}?", "what is the command to {task}?",
            "explain how I can {task} on my own"),
           ("what should I type to {task} by hand?", "no need to do it, just tell me how to {task}"),
           answer="Run `{command}` in your terminal.", contains=("{command}",), wrap=False),
    Intent("greet", "no_tool", (),
           ("hi", "hello", "hey there", "good morning", "hello, who are you?"), ("howdy", "hi again, what's up?"),
           answer="Hi! I can browse the web, run commands and work with your files. What do you need?",
           contains=("browse",), wrap=False),
    Intent("thanks", "no_tool", (),
           ("thanks!", "thank you, that's all", "great, thanks", "perfect, thank you"), ("cheers, appreciate it", "ok thx"),
           answer="You're welcome!", contains=("welcome",), wrap=False),
    Intent("abilities", "no_tool", (),
           ("what can you do?", "which tools do you have?", "what are your tools?"), ("what are you able to help with?",),
           answer="I can open and search web pages, run terminal commands, read, search and write files, check the "
                  "weather, add calendar events and send email.",
           contains=("terminal",), wrap=False),
)

PRETRAIN_TOOLS = {t["function"]["name"]: t for t in [
    _tool("play_music", "Play a song.", song="string", artist="string"),
    _tool("translate_text", "Translate text.", text="string", language="string"),
    _tool("stock_price", "Latest stock price.", symbol="string"),
    _tool("find_recipe", "Find a recipe.", dish="string", max_minutes="integer"),
    _tool("set_timer", "Start a timer.", minutes="integer", label="string"),
    _tool("book_table", "Reserve a restaurant table.", restaurant="string", people="integer"),
    _tool("convert_currency", "Convert money.", amount="number", source="string", target="string"),
    _tool("set_light", "Switch a light.", room="string", on="boolean"),
    _tool("define_word", "Dictionary definition.", word="string"),
    _tool("track_package", "Track a parcel.", tracking_id="string"),
    _tool("get_news", "Top news headlines.", topic="string", count="integer"),
    _tool("add_todo", "Add a todo item.", task="string", priority="enum:low,medium,high"),
]}

PRETRAIN_INTENTS = (
    Intent("music", "media", ("song",), ("play {song} by {artist}", "put on {song} from {artist}", "play me {song} by {artist}"),
           ("queue up {song} by {artist}",), "play_music", {"song": "{song}", "artist": "{artist}"},
           '{{"playing": "{song}", "length_min": {minutes}}}', "Now playing {song} ({minutes} min).", ("{minutes}",)),
    Intent("translate", "language", ("translate",), ("translate '{text}' into {language}", "say '{text}' in {language}"),
           ("render '{text}' in {language}",), "translate_text", {"text": "{text}", "language": "{language}"},
           '{{"translation": "{translation}"}}', "In {language}: {translation}", ("{translation}",)),
    Intent("stock", "money", ("stock",), ("check the stock price of {symbol}", "get a quote for {symbol}", "quote {symbol}"),
           ("look up what {symbol} trades at",), "stock_price", {"symbol": "{symbol}"},
           '{{"symbol": "{symbol}", "price": {price}}}', "{symbol} trades at {price}.", ("{price}",)),
    Intent("recipe", "food", ("recipe",), ("find a {dish} recipe under {max_minutes} minutes", "get a recipe for {dish}, max {max_minutes} minutes"),
           ("dig up a {dish} recipe, {max_minutes} minutes tops",), "find_recipe", {"dish": "{dish}", "max_minutes": "{max_minutes}"},
           '{{"title": "{dish}", "steps": {steps}}}', "Found a {dish} with {steps} steps.", ("{steps}",)),
    Intent("timer", "home", ("timer",), ("set a {minutes} minute timer for {label}", "timer {minutes} min for {label}"),
           ("remind me in {minutes} minutes about {label}",), "set_timer", {"minutes": "{minutes}", "label": "{label}"},
           '{{"ok": true}}', "Timer set: {label} in {minutes} minutes.", ("{minutes}",)),
    Intent("table", "food", ("table",), ("book a table for {people} at {restaurant}", "reserve {restaurant} for {people} people"),
           ("get us seats at {restaurant}, party of {people}",), "book_table", {"restaurant": "{restaurant}", "people": "{people}"},
           '{{"confirmed": true, "time": "{time}"}}', "Booked {restaurant} for {people} at {time}.", ("{time}",)),
    Intent("money", "money", ("money",), ("convert {amount} {source} to {target}", "change {amount} {source} to {target}"),
           ("turn {amount} {source} into {target}",), "convert_currency",
           {"amount": "{amount}", "source": "{source}", "target": "{target}"},
           '{{"result": {converted}}}', "{amount} {source} is {converted} {target}.", ("{converted}",)),
    Intent("light_on", "home", ("room",), ("turn on the {room} light", "switch the {room} light on"), ("lights on in the {room}",),
           "set_light", {"room": "{room}", "on": True}, '{{"room": "{room}", "on": true}}', "The {room} light is on.", ("on",)),
    Intent("light_off", "home", ("room",), ("turn off the {room} light", "switch the {room} light off"), ("kill the {room} light",),
           "set_light", {"room": "{room}", "on": False}, '{{"room": "{room}", "on": false}}', "The {room} light is off.", ("off",)),
    Intent("define", "language", ("word",), ("define {word}", "look up the word {word}"), ("give me the meaning of {word}",),
           "define_word", {"word": "{word}"}, '{{"definition": "{meaning}"}}', "{word}: {meaning}.", ("{meaning}",)),
    Intent("package", "home", ("package",), ("track package {tracking}", "find my package {tracking}"), ("check on parcel {tracking}",),
           "track_package", {"tracking_id": "{tracking}"}, '{{"location": "{where}"}}', "Your parcel is in {where}.", ("{where}",)),
    Intent("news", "media", ("news",), ("get the top {count} headlines about {topic}", "show {count} news stories on {topic}"),
           ("fetch the {count} latest {topic} stories",), "get_news", {"topic": "{topic}", "count": "{count}"},
           '{{"headlines": ["{headline}"]}}', "Top story: {headline}.", ("{headline}",)),
    Intent("todo", "home", ("todo",), ("add '{todo}' to my todo list, {priority} priority", "make a todo: {todo} ({priority})"),
           ("remember to {todo}, {priority} priority",), "add_todo", {"task": "{todo}", "priority": "{priority}"},
           '{{"added": true}}', "Added '{todo}' ({priority}).", ("{todo}",)),
    Intent("hello", "chat", ("person",), ("hello", "hi there", "good evening", "hello, I'm {person}"),
           ("yo", "hey, {person} here"),
           answer="Hello! Want some music, a translation or a recipe?", contains=("music",), wrap=False),
    Intent("bye", "chat", (), ("thanks, bye", "that's it for now"), ("later!",),
           answer="Glad to help. Bye!", contains=("bye",), wrap=False),
    Intent("joke", "chat", ("word",), ("tell me a joke about {word}", "say something funny about {word}"),
           ("make me laugh about {word}",),
           answer="Why did the {word} blush? It saw the salad dressing.", contains=("{word}",), wrap=False),
)

# The pre-training surface's own take on the task's kinds of request: other tool names, bare URLs, and a
# no-tool how-to answer without the command. It stands in for what a real base knows before it meets
# *your* schemas (that "read docs/x.md" means copying the path into a read call), while calling none of
# the task's tools: the base starts near zero on the task, and the demo's training teaches the names
# and formats. It uses every phrasing and wrapper (recipe 3; recipe 2 used the training ones only).
#
# Task tool -> (its sibling, the sibling's description). A sibling keeps the task tool's parameters
# (`path`, `url`, `query`: keys a real base has seen in countless schemas) but not their formats (a
# bare site, no `https://`).
_SIBLINGS = {
    "browser_navigate": ("open_url", "Load a web page."), "web_search": ("find_online", "Query a search engine."),
    "browser_click": ("press", "Press an element."), "terminal": ("shell", "Execute in a shell."),
    "read_file": ("cat_file", "Print a file."), "search_files": ("grep_dir", "Grep a folder."),
    "write_file": ("save_file", "Store text in a file."), "get_weather": ("forecast", "Weather forecast."),
    "create_event": ("calendar_add", "New calendar entry."), "send_email": ("mail", "Mail someone."),
}
SIBLING_TOOLS = {name: {**TASK_TOOLS[task_name], "function": {**TASK_TOOLS[task_name]["function"], "name": name,
                                                               "description": description}}
                 for task_name, (name, description) in _SIBLINGS.items()}


# A sibling's final answer after its tool returns: its own convention, which names what the request
# said and not the result's value that the task's answer must copy. So the base can answer from tool
# results (its own tools teach that) but passes no task finalization case before task training.
_SIBLING_ANSWERS = {
    "navigate": "Loaded {site}.", "search": "Here is what I found on {query}.", "click": "Pressed {ref}.",
    "terminal": "Ran it in the shell.", "read": "Printed {path}.", "grep": "Grepped {dir} for {pattern}.",
    "write": "Stored the text in {path}.", "weather": "Got the forecast for {city}.",
    "event": "Noted {event} for {date}.", "email": "Mailed {to}.",
}


# The sibling's small talk (recipe 4): a real base tells thanks from hello and knows the command for a
# how-to, so the base does too, in its own words; the task teaches only its conventions. (Recipe 3 gave
# all three the same answer and no command, which left the task to teach what any base already knows.)
_SIBLING_CHAT = {
    "howto": ("A shell job: {command} (say the word and I run it).", ("{command}",)),
    "greet": ("Hello! I handle pages, shells and files, and music too.", ("music",)),
    "thanks": ("Any time, happy to help.", ("happy",)),
    "abilities": ("I handle web pages, shells, files, forecasts, calendars and mail.", ("shells",)),
}


def _sibling(intent: Intent) -> Intent:
    """A task intent as the pre-training surface asks it: the same phrasings, its own call and answers."""
    category = "sibling_" + intent.category
    if intent.tool is None:
        answer, contains = _SIBLING_CHAT[intent.name]
        return replace(intent, category=category, answer=answer, contains=contains)
    arguments = {key: "{site}" if spec == "https://{site}" else spec for key, spec in intent.arguments.items()}
    return replace(intent, category=category, tool=_SIBLINGS[intent.tool][0], arguments=arguments,
                   answer=_SIBLING_ANSWERS[intent.name], contains=())


TASK = Surface("task", "train", TASK_TOOLS, TASK_INTENTS, ("browser", "terminal", "file", "apps", "no_tool", "finalization"))
PRETRAIN = Surface("pretrain", "known", {**PRETRAIN_TOOLS, **SIBLING_TOOLS},
                   PRETRAIN_INTENTS + tuple(_sibling(intent) for intent in TASK_INTENTS),
                   ("media", "language", "money", "food", "home", "chat", "sibling_browser", "sibling_terminal",
                    "sibling_file", "sibling_apps", "sibling_no_tool", "finalization"))
SURFACES = {"task": TASK, "pretrain": PRETRAIN}


def get_surface(name: str | Surface) -> Surface:
    if isinstance(name, Surface):
        return name
    if name not in SURFACES:
        raise ValueError(f"unknown surface {name!r}; use one of {sorted(SURFACES)}")
    return SURFACES[name]


# ---------------------------------------------------------------- building turns

_LONE_SLOT = re.compile(r"^\{(\w+)\}$")


def _fill(spec: Any, slots: dict) -> Any:
    """A format string over the slots; a lone `{slot}` keeps the slot's type; constants pass through."""
    if not isinstance(spec, str):
        return spec
    lone = _LONE_SLOT.match(spec)
    return slots[lone.group(1)] if lone else spec.format(**slots)


def _slots(intent: Intent, rng: random.Random, pool: str) -> dict:
    slots: dict = {}
    for maker in intent.makers:
        slots.update(SLOT_MAKERS[maker](rng, pool))
    return slots


def _prompt(intent: Intent, rng: random.Random, slots: dict, split: str) -> tuple[str, str, str]:
    """(prompt, phrasing, wrapper) for a split.

    "train" / "dev": a training phrasing in a training wrapper. "test": a training phrasing in a
    held-out wrapper (with held-out fillers, from `_slots`): a request the task rows never show,
    but made of parts they do. "paraphrase": a held-out phrasing, in any wrapper: wording the task
    rows never use, which takes a base that knows what the words mean.
    """
    wrappers, held_wrappers = (WRAPPERS, HELD_WRAPPERS) if intent.wrap else (["{p}"], HELD_CHAT_WRAPPERS)
    if split == "known":  # the pre-training surface: every wording, as a real base knows the language
        phrasing, wrapper = rng.choice(intent.phrasings + intent.held_phrasings), rng.choice(wrappers + held_wrappers)
    elif split == "paraphrase":
        phrasing, wrapper = rng.choice(intent.held_phrasings), rng.choice(wrappers + held_wrappers)
    elif split == "test":
        phrasing, wrapper = rng.choice(intent.phrasings), rng.choice(held_wrappers)
    else:
        phrasing, wrapper = rng.choice(intent.phrasings), rng.choice(TASK_WRAPPERS if intent.wrap else CHAT_WRAPPERS)
    return wrapper.format(p=phrasing.format(**slots)), phrasing, wrapper


def _call(intent: Intent, slots: dict) -> dict:
    arguments = {key: _fill(spec, slots) for key, spec in intent.arguments.items()}
    return {"type": "function", "function": {"name": intent.tool, "arguments": arguments}}


def _tool_list(surface: Surface, rng: random.Random, needed: str | None, k: int) -> list[str]:
    """`k` tool names: the needed one (if any) plus random distractors, shuffled."""
    others = [name for name in surface.tools if name != needed]
    names = ([needed] if needed else []) + rng.sample(others, k - (1 if needed else 0))
    rng.shuffle(names)
    return names


def _choose(surface: Surface, rng: random.Random, category: str) -> tuple[Intent, bool]:
    """An intent of `category` ('finalization': any tool intent) and whether it is a finalization turn."""
    if category == "finalization":
        return rng.choice([i for i in surface.intents if i.tool]), True
    return rng.choice([i for i in surface.intents if i.category == category]), False


def _conversation(intent: Intent, final: bool, prompt: str, slots: dict) -> tuple[list[dict], dict]:
    """(messages up to the turn the model answers, the gold assistant turn)."""
    messages = [{"role": "user", "content": prompt}]
    if intent.tool is None:
        return messages, {"role": "assistant", "content": _fill(intent.answer, slots)}
    call = {"role": "assistant", "content": "", "tool_calls": [_call(intent, slots)]}
    if not final:
        return messages, call
    messages += [call, {"role": "tool", "content": intent.result.format(**slots)}]
    return messages, {"role": "assistant", "content": intent.answer.format(**slots)}


# ---------------------------------------------------------------- rows and suites


def generate_rows(n: int, seed: int = 0, surface: str | Surface = "task", tools_per_row: int = 2,
                  weights: dict[str, float] | None = None, full_traces: bool = False) -> list[dict]:
    """`n` training rows `{"id", "messages", "tools"}` drawn from the training pools only.

    Categories are drawn with `weights` (default: uniform over the surface's categories); the
    same arguments always give the same rows. `full_traces`: a tool call's row goes on to the tool's
    result and the answer from it (the loss is on both assistant turns), as a real agent's trace does,
    instead of ending at the call.
    """
    surface = get_surface(surface)
    weights = weights or {c: 1.0 for c in surface.categories}
    unknown = sorted(set(weights) - set(surface.categories))
    if unknown:
        raise ValueError(f"weights name unknown categories {unknown}; {surface.name} has {list(surface.categories)}")
    if not 1 <= tools_per_row <= len(surface.tools):
        raise ValueError(f"tools_per_row={tools_per_row}: use 1..{len(surface.tools)}")
    rng = random.Random(f"{surface.name}-rows-{seed}")
    categories = list(weights)
    rows = []
    for index in range(n):
        intent, final = _choose(surface, rng, rng.choices(categories, [weights[c] for c in categories])[0])
        slots = _slots(intent, rng, surface.pool)
        prompt, _, _ = _prompt(intent, rng, slots, "known" if surface.pool == "known" else "train")
        messages, gold = _conversation(intent, final or (full_traces and intent.tool is not None), prompt, slots)
        names = _tool_list(surface, rng, intent.tool, tools_per_row)
        rows.append({"id": f"{surface.name}-{seed}-{index}", "messages": messages + [gold],
                     "tools": [surface.tools[name] for name in names]})
    return rows


def _expect(intent: Intent, final: bool, slots: dict, gold: dict) -> dict:
    """The suite expectation for a case: substring matchers on string arguments, exact on the rest."""
    if intent.tool is not None and not final:
        arguments = gold["tool_calls"][0]["function"]["arguments"]
        matchers = {key: {"contains": value} if isinstance(value, str) else {"exact": value}
                    for key, value in arguments.items()}
        return {"tool_call": {"name": intent.tool, "arguments": matchers, "example_arguments": arguments}}
    answer = {"contains": [str(_fill(c, slots)) for c in intent.contains], "example_answer": gold["content"]}
    return {"final_answer" if final else "no_tool_call": answer}


SPLITS = {
    "test": "training phrasings in held-out wrappers, held-out fillers.",
    "paraphrase": "held-out phrasings, held-out fillers.",
    "dev": "training pools, for repair sets.",
}


def build_suite(surface: str | Surface = "task", split: str = "test", per_category: int = 10, seed: int = 0,
                tools_per_row: int = 2) -> dict:
    """An eval suite (the lfm_mlx.suites JSON schema) with `per_category` cases per category.

    split="test": training phrasings in held-out wrappers, with held-out fillers, every case
    `held_out`, so no prompt can occur in training rows. split="paraphrase": held-out phrasings
    (wording the rows never use) with held-out fillers. split="dev": training pools with a separate
    seed, not held out, for repair sets (which never train on held-out cases).
    """
    surface = get_surface(surface)
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {list(SPLITS)}")
    held = split != "dev"
    rng = random.Random(f"{surface.name}-suite-{split}-{seed}")
    cases, seen = [], set()
    for category in surface.categories:
        made, attempts = 0, 0
        while made < per_category:
            attempts += 1
            if attempts > 50 * per_category:
                raise ValueError(f"category {category!r} of surface {surface.name!r} has fewer than {per_category} "
                                 f"distinct {split} prompts; lower per_category or add phrasings")
            intent, final = _choose(surface, rng, category)
            slots = _slots(intent, rng, "held" if held else surface.pool)
            prompt, phrasing, wrapper = _prompt(intent, rng, slots, split)
            if prompt in seen:
                continue  # a suite asks each prompt once
            seen.add(prompt)
            messages, gold = _conversation(intent, final, prompt, slots)
            cases.append({
                "id": f"{category}-{made + 1:02d}", "category": category, "messages": messages,
                "tools": _tool_list(surface, rng, intent.tool, tools_per_row),
                "expect": _expect(intent, final, slots, gold), "held_out": held,
                "notes": f"intent {intent.name}; phrasing {phrasing!r}; wrapper {wrapper!r}",
            })
            made += 1
    name = f"demo_{surface.name}" + ("" if split == "test" else f"_{split}")
    description = f"Synthetic {surface.name} surface ({split} split, seed {seed}) from lfm_mlx.task: {SPLITS[split]}"
    return {"name": name, "description": description, "version": 1, "tools": dict(surface.tools), "cases": cases}


def _user_prompts(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "user"]


def check_disjoint(rows: list[dict], suite: dict) -> None:
    """Raise ValueError if a held-out case's prompt occurs in the rows, or it reuses a training
    phrasing + wrapper pair (the case notes name them)."""
    trained = {p for row in rows for p in _user_prompts(row["messages"])}
    problems = []
    for case in suite["cases"]:
        if not case.get("held_out"):
            continue
        for prompt in _user_prompts(case["messages"]):
            if prompt in trained:
                problems.append(f"case {case['id']!r}: prompt {prompt!r} occurs in the training rows")
    if problems:
        raise ValueError(f"suite {suite['name']!r} is not held out: " + "; ".join(problems[:5])
                         + f" ({len(problems)} in all). Regenerate with other seeds or more held-out fillers")


def write_task(out_dir: str | Path, rows: int = 600, seed: int = 0, per_category: int = 10,
               tools_per_row: int = 2, surface: str = "task", weights: dict[str, float] | None = None,
               full_traces: bool = False) -> dict[str, Path]:
    """Write train.jsonl, suite.json (held-out test), suite_paraphrase.json and suite_dev.json into
    out_dir (atomically each). `weights`, `full_traces`: the training rows' mix and shape (`generate_rows`).

    Both held-out suites are checked against the rows written (`check_disjoint`)."""
    out_dir = Path(out_dir)
    train = generate_rows(rows, seed, surface, tools_per_row, weights, full_traces)
    atomic_write_text(out_dir / "train.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in train))
    paths = {"train": out_dir / "train.jsonl"}
    for split, key in (("test", "suite"), ("paraphrase", "suite_paraphrase"), ("dev", "suite_dev")):
        suite = build_suite(surface, split, per_category, seed, tools_per_row)
        check_disjoint(train, suite)
        paths[key] = out_dir / f"{key}.json"
        atomic_write_json(paths[key], suite)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lfm_mlx.task", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("out_dir", help="directory for train.jsonl, suite.json and suite_dev.json")
    parser.add_argument("--rows", type=int, default=600, help="training rows to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-category", type=int, default=10, help="suite cases per category")
    parser.add_argument("--tools-per-row", type=int, default=2, help="tools listed per row / case (the needed one + distractors)")
    parser.add_argument("--surface", default="task", choices=sorted(SURFACES))
    args = parser.parse_args(argv)
    paths = write_task(args.out_dir, args.rows, args.seed, args.per_category, args.tools_per_row, args.surface)
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
