"""Orders: an editable Tabulator of the signed-in user's orders, and a total that follows edits."""

import pandas as pd
import panel as pn

pn.extension("tabulator")

user = pn.state.user or "guest"
orders = pd.DataFrame({
    "item": ["Keyboard", "Monitor", "Desk lamp", "Chair"],
    "quantity": [2, 1, 3, 1],
    "price": [49.0, 189.0, 24.5, 129.0],
})
table = pn.widgets.Tabulator(orders, show_index=False, layout="fit_data_table", name="orders")
total = pn.indicators.Number(name=f"Total for {user}", format="{value:,.2f} €", font_size="28pt")


def update_total(*_):
    frame = table.value
    total.value = float((frame["quantity"] * frame["price"]).sum())


table.param.watch(update_total, "value")
update_total()
pn.Column(total, table).servable()
