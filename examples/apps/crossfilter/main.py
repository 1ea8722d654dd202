"""Crossfilter: explore a synthetic cars dataset by choosing what the axes,
colour and size of a scatter plot show.

A directory app, served with::

    flask-docsync serve examples/apps/crossfilter

Next to ``main.py``: ``templates/index.html`` (a Jinja template extending
Bokeh's base page, filled with the ``heading`` and ``description``
template variables set below), ``static/style.css`` (served at
``/crossfilter/static/style.css``) and ``theme.yaml`` (applied to every
model of the document).

The data is generated with numpy (a fixed seed), in the spirit of the
classic auto-mpg data set, so the example needs no download.
"""

import numpy as np

from bokeh.io import curdoc
from bokeh.layouts import column, row
from bokeh.models import Div, Select
from bokeh.palettes import Spectral5
from bokeh.plotting import figure

N_CARS = 392
SIZES = list(range(6, 22, 3))
COLORS = Spectral5
N_SIZES = len(SIZES)
N_COLORS = len(COLORS)


def make_cars(n: int, seed: int = 1970) -> dict[str, np.ndarray]:
    """An auto-mpg-like table: bigger engines are heavier, stronger and thirstier."""
    rng = np.random.default_rng(seed)
    cyl = rng.choice([4, 6, 8], size=n, p=[0.5, 0.22, 0.28])
    displ = np.round(10.3 * cyl ** 1.7 * rng.normal(1.0, 0.12, n)).clip(68, 455)
    hp = np.round(displ * rng.normal(0.45, 0.06, n) + 20.0).clip(46, 230)
    weight = np.round(1200.0 + displ * 8.5 + rng.normal(0.0, 250.0, n)).clip(1600, 5140)
    yr = rng.integers(70, 83, n)
    accel = np.round(24.0 - hp / 20.0 + rng.normal(0.0, 1.5, n), 1).clip(8.0, 24.8)
    mpg = np.round(50.0 - weight / 125.0 + (yr - 70) * 0.5 + rng.normal(0.0, 2.5, n), 1).clip(9.0, 46.6)
    origin = np.where(cyl == 8, "North America",
                      rng.choice(["North America", "Europe", "Asia"], size=n, p=[0.45, 0.25, 0.30]))
    return {
        "mpg": mpg,
        "cyl": cyl.astype(str),
        "displ": displ,
        "hp": hp,
        "weight": weight,
        "accel": accel,
        "yr": yr.astype(str),
        "origin": origin,
    }


df = make_cars(N_CARS)
columns = sorted(df)
discrete = [name for name in columns if df[name].dtype.kind == "U"]
continuous = [name for name in columns if name not in discrete]


def group_codes(values: np.ndarray, n_groups: int) -> np.ndarray:
    """Codes 0..n_groups-1: quantile bins of a continuous column, categories of a discrete one."""
    if values.dtype.kind != "U" and len(np.unique(values)) > n_groups:
        edges = np.unique(np.quantile(values, np.linspace(0, 1, n_groups + 1))[1:-1])
        return np.searchsorted(edges, values, side="right")
    _, codes = np.unique(values, return_inverse=True)
    return codes % n_groups


def create_figure():
    xs = df[x.value]
    ys = df[y.value]
    x_title = x.value.title()
    y_title = y.value.title()

    kw = {}
    if x.value in discrete:
        kw["x_range"] = sorted(set(xs))
    if y.value in discrete:
        kw["y_range"] = sorted(set(ys))
    kw["title"] = f"{x_title} vs {y_title}"

    p = figure(height=600, width=800, tools="pan,box_zoom,hover,reset", **kw)
    p.xaxis.axis_label = x_title
    p.yaxis.axis_label = y_title

    if x.value in discrete:
        p.xaxis.major_label_orientation = np.pi / 4

    sz = 9
    if size.value != "None":
        sz = [SIZES[code] for code in group_codes(df[size.value], N_SIZES)]

    c = "#31AADE"
    if color.value != "None":
        c = [COLORS[code] for code in group_codes(df[color.value], N_COLORS)]

    p.scatter(x=xs, y=ys, color=c, size=sz, line_color="white", alpha=0.6,
              hover_color="white", hover_alpha=0.5)
    return p


def update(attr, old, new):
    layout.children[1] = create_figure()


x = Select(title="X-Axis", value="mpg", options=columns, name="x")
x.on_change("value", update)

y = Select(title="Y-Axis", value="hp", options=columns, name="y")
y.on_change("value", update)

size = Select(title="Size", value="None", options=["None"] + continuous, name="size")
size.on_change("value", update)

color = Select(title="Color", value="None", options=["None"] + continuous, name="color")
color.on_change("value", update)

note = Div(text=f"{N_CARS} synthetic cars", css_classes=["note"], name="note")
controls = column(x, y, color, size, note, width=200)
layout = row(controls, create_figure(), name="layout")

doc = curdoc()
doc.add_root(layout)
doc.title = "Crossfilter"

# The page URL of this app (with any --prefix), so the template can link
# static/style.css however the page was requested (/crossfilter or /crossfilter/).
request = doc.session_context.request if doc.session_context else None
app_url = (request.path if request is not None and request.path else "/crossfilter").rstrip("/")
if app_url.endswith("/autoload.js"):
    app_url = app_url[: -len("/autoload.js")]
doc.template_variables.update(
    heading="Crossfilter",
    description=(
        "Pick the columns shown on the X and Y axes, and the ones that set the colour"
        " and size of each point. Every change rebuilds the plot on the server."
    ),
    static_url=f"{app_url}/static",
)
