"""The documents of bench/apps/bcast.py under ``bokeh serve``: the usual
recipe for broadcasting there (a module imported once per process keeps
every session's document; the publisher adds a next-tick callback to each)."""

import weakref

DOCS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
