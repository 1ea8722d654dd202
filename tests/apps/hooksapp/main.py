"""Main script of the hooksapp directory app (templates, static, theme, hooks).

The ``hook`` Div says whether the async on_session_created hook had already
recorded this session when the script ran; the template shows ``greeting``.
"""

import os

from bokeh.io import curdoc
from bokeh.models import Div

doc = curdoc()
session_id = doc.session_context.id
path = os.environ.get("HOOKSAPP_RECORD")
records = open(path, encoding="utf-8").read().splitlines() if path and os.path.exists(path) else []
doc.add_root(Div(text=f"hook_ran={'session_created ' + session_id in records}", name="hook"))
doc.template_variables["greeting"] = "Hello from hooksapp"
doc.title = "hooksapp"
