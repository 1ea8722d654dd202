"""A task for ``pn.state.schedule_task``: Panel refuses callbacks defined in an app script."""

import datetime as dt

import panel as pn

KEY = "docsync_ticks"


def tick() -> None:
    pn.state.cache[KEY] = pn.state.cache.get(KEY, 0) + 1


def schedule() -> None:
    pn.state.schedule_task("docsync-ticks", tick, period=dt.timedelta(milliseconds=200))
