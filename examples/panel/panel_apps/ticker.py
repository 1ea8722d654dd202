"""Ticker: a streaming trend indicator fed by a periodic callback."""

import random

import panel as pn

pn.extension()

state = {"t": 0, "price": 100.0}
trend = pn.indicators.Trend(
    name="Price", data={"x": [0], "y": [state["price"]]}, plot_type="area", width=320, height=200,
)


def tick():
    state["t"] += 1
    state["price"] = max(1.0, state["price"] + random.gauss(0, 1.5))
    trend.stream({"x": [state["t"]], "y": [state["price"]]}, rollover=60)


pn.state.add_periodic_callback(tick, period=500)
pn.Column(trend).servable()
