"""A Panel JSComponent whose stylesheet is a file next to it (served from ``/components/``)."""

import param
from panel.custom import JSComponent


class Fancy(JSComponent):
    label = param.String(default="fancy")

    _esm = """
    export function render({ model, el }) {
      const div = document.createElement("div")
      div.className = "fancy-label"
      const show = () => { div.textContent = `${model.label} ready` }
      show()
      model.on("label", show)
      el.appendChild(div)
    }
    """

    _stylesheets = ["docsync_fancy.css"]
