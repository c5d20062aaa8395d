"""A synthetic tool-use task for the demo: two tool surfaces, a seeded row generator, held-out suites.

The `task` surface is Hermes-style (browser navigate / search / click, terminal, file read / search /
write, plus weather, calendar and email): the demo teaches it and evaluates it. The `pretrain`
surface is what `lfm_mlx.demo.pretrain` gives the tiny base its general tool-call ability on: other domains
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

from lfm_mlx.demo.task.build import SPLITS, build_suite, check_disjoint, generate_rows, write_task
from lfm_mlx.demo.task.cli import main
from lfm_mlx.demo.task.fillers import MADE_UP_SHARE, SLOT_MAKERS
from lfm_mlx.demo.task.surfaces import (CHAT_WRAPPERS, HELD_CHAT_WRAPPERS, HELD_WRAPPERS, PRETRAIN, PRETRAIN_INTENTS,
                                   PRETRAIN_TOOLS, SIBLING_TOOLS, SURFACES, TASK, TASK_INTENTS, TASK_TOOLS,
                                   TASK_WRAPPERS, WRAPPERS, Intent, Surface, get_surface)

# The pools and helpers tests/test_task.py reads (module-private, kept reachable here as before the split).
from lfm_mlx.demo.task.build import _prompt, _slots  # noqa: F401
from lfm_mlx.demo.task.fillers import (_CITIES, _HELD_CITIES, _HELD_LABELS, _HELD_NAMES, _HELD_TOPICS,  # noqa: F401
                                  _HELD_WORDS, _LABELS, _NAMES, _TOPICS, _WORDS, _splice)

__all__ = [
    "CHAT_WRAPPERS", "HELD_CHAT_WRAPPERS", "HELD_WRAPPERS", "MADE_UP_SHARE", "PRETRAIN", "PRETRAIN_INTENTS",
    "PRETRAIN_TOOLS", "SIBLING_TOOLS", "SLOT_MAKERS", "SPLITS", "SURFACES", "TASK", "TASK_INTENTS", "TASK_TOOLS",
    "TASK_WRAPPERS", "WRAPPERS", "Intent", "Surface", "build_suite", "check_disjoint", "generate_rows",
    "get_surface", "main", "write_task",
]
