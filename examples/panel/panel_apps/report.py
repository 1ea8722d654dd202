"""Report: a full Panel template page (FastListTemplate) with a sidebar that drives the main area."""

import numpy as np
import pandas as pd
import panel as pn

pn.extension("tabulator")

points = pn.widgets.IntSlider(name="Points", start=10, end=200, value=50)
seed = pn.widgets.IntInput(name="Seed", value=1)


def summary(points, seed):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"x": rng.normal(size=points), "y": rng.normal(size=points)})
    return pn.Column(
        pn.pane.Markdown(f"### {points} points, seed {seed}"),
        pn.widgets.Tabulator(frame.describe().round(3), disabled=True),
    )


pn.template.FastListTemplate(
    title=f"Report for {pn.state.user or 'guest'}",
    sidebar=[points, seed],
    main=[pn.bind(summary, points, seed)],
).servable()
