"""A session whose discard takes a while: a callback that cleans up slowly when stopped.

A ``without_document_lock`` periodic callback waits for a long time (as a
callback waiting on a slow service would); when its session is destroyed
and the callback is stopped, it prints ``cleaning up <id>`` and takes 2 s
to finish (closing that service's connection), so the discard of the
session spans those 2 s.
"""

import gevent
from bokeh.document import without_document_lock
from bokeh.io import curdoc
from bokeh.models import Div

doc = curdoc()
sid = doc.session_context.id
doc.add_root(Div(text="fresh", name="result"))
print(f"session created {sid}", flush=True)


@without_document_lock
def wait_for_service():
    try:
        gevent.sleep(60)
    except gevent.GreenletExit:
        print(f"cleaning up {sid}", flush=True)
        gevent.sleep(2)
        raise


doc.add_periodic_callback(wait_for_service, 50)
