"""A `.servable()` Panel app whose assets are all Panel's own: a JSComponent
with a stylesheet file (``/components/``), and a Tabulator added from a
button (its library declared with ``pn.extension("tabulator")``, as Panel
requires; embedded in a Flask page, the page's head is rendered before the
first run of this script imports it)."""

import sys
from pathlib import Path

import pandas as pd
import panel as pn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docsync_fancy import Fancy  # noqa: E402

pn.extension("tabulator")

fancy = Fancy(label="fancy")
add = pn.widgets.Button(name="add a table", css_classes=["add-table"])
tables = pn.Column()


def add_table(event):
    frame = pd.DataFrame({"city": ["Oslo", "Lima"], "people": [709_000, 10_000_000]})
    tables.append(pn.widgets.Tabulator(frame, name="cities"))


add.on_click(add_table)
pn.Column(fancy, add, tables).servable()
