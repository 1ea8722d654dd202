"""A `.servable()` Panel app: an onload callback, held appends, a periodic callback with a count.

Each reports what Panel thought in the ``status`` Markdown so a browser test
can read it from the DOM.
"""

import panel as pn

pn.extension()

status = pn.pane.Markdown("waiting", name="status", css_classes=["status"])
rows = pn.Column(name="rows")
add = pn.widgets.Button(name="add a row", css_classes=["add"])
ticks = pn.pane.Markdown("ticks 0", css_classes=["ticks"])
count = {"ticks": 0}


def on_load():
    # Panel marks the page loaded once its onload callbacks have run.
    status.object = "onload ran"


def append_row(event):
    with pn.io.hold():
        rows.append(pn.pane.Markdown(f"row {len(rows) + 1} loaded={pn.state.loaded}", css_classes=["row"]))


def tick():
    count["ticks"] += 1
    ticks.object = f"ticks {count['ticks']}"


pn.state.onload(on_load)
add.on_click(append_row)
pn.state.add_periodic_callback(tick, period=100, count=5)
pn.Column(status, add, rows, ticks).servable()
