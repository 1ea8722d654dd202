"""A Panel template app (FastListTemplate): sidebar, main area and header from Panel's template."""

import panel as pn

pn.extension()

count = {"n": 0}
bump = pn.widgets.Button(name="bump", css_classes=["bump"])
shown = pn.pane.Markdown("value 0", css_classes=["value"])


def on_bump(event):
    count["n"] += 1
    shown.object = f"value {count['n']}"


bump.on_click(on_bump)
pn.template.FastListTemplate(title="Docsync template", sidebar=[bump], main=[shown]).servable()
