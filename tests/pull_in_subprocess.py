"""Run bokeh.client.pull_session in a fresh process (so BOKEH_SECRET_KEY in its
environment is seen when bokeh is imported, as bokeh.client requires) and
print the text of the named model."""

import sys

from bokeh.client import pull_session

url, name = sys.argv[1], sys.argv[2]
arguments = dict(a.split("=", 1) for a in sys.argv[3:])
with pull_session(url=url, arguments=arguments) as session:
    print(session.document.select_one({"name": name}).text)
