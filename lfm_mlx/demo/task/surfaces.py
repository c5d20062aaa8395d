"""The task's wording and tools: wrappers (colloquial and terse), intents, the `task` and `pretrain` surfaces."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


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

