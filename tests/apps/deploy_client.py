"""bokeh.client against a deployment, in a fresh process (so BOKEH_SECRET_KEY
and BOKEH_SIGN_SESSIONS in its environment are seen when bokeh is imported).

``python deploy_client.py URL N`` opens N sessions of the app at URL one
after another; in each it reads the ``pid`` Div, sets the slider and checks,
by pulling the document again, that the server's callback answered in
``result``. Prints one JSON list of
the pids seen.
"""

import json
import sys

from bokeh.client import pull_session

url, count = sys.argv[1], int(sys.argv[2])
pids = []
for i in range(count):
    with pull_session(url=url) as session:
        doc = session.document
        pids.append(doc.select_one({"name": "pid"}).text)
        value = 30 + i
        doc.select_one({"name": "slider"}).value = value
        # bokeh.client drops patches that arrive while it waits for a reply,
        # so read the server's answer by pulling the document again (same
        # connection, after the PATCH-DOC).
        session.pull()
        text = doc.select_one({"name": "result"}).text
        assert text == f"value={value}", text
print(json.dumps(pids))
