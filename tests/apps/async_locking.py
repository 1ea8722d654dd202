"""``async def`` callbacks that lock the document themselves, and ones that never end.

``?mode=`` picks the behaviour:

locked      the slider's on_change schedules a ``without_document_lock``
            coroutine that awaits ``session_context.with_locked_document``
            twice: with a coroutine function, then with a plain one. They
            set ``result`` to ``async <value>`` and ``sync <value>``.
forever     a ``without_document_lock`` coroutine prints ``async tick <id>``
            every 50 ms until it is cancelled, then ``async cancelled <id>``;
            ``on_session_destroyed`` prints ``session destroyed <id>``.
"""

import asyncio

from bokeh.document import without_document_lock
from bokeh.io import curdoc
from bokeh.models import Div, Slider

doc = curdoc()
context = doc.session_context
mode = context.request.arguments.get("mode", [b""])[0].decode()
sid = context.id

slider = Slider(start=0, end=100, value=1, step=1, title="value", name="slider")
result = Div(text="", name="result")
doc.add_root(slider)
doc.add_root(result)

if mode == "locked":

    def on_value(attr, old, new):
        @without_document_lock
        async def work():
            async def apply_async(locked_doc):
                await asyncio.sleep(0.01)
                locked_doc.get_model_by_name("result").text = f"async {new}"

            def apply_sync(locked_doc):
                locked_doc.get_model_by_name("result").text = f"sync {new}"

            await context.with_locked_document(apply_async)
            await asyncio.sleep(0.01)
            await context.with_locked_document(apply_sync)

        doc.add_next_tick_callback(work)

    slider.on_change("value", on_value)

elif mode == "forever":

    @without_document_lock
    async def forever():
        try:
            while True:
                await asyncio.sleep(0.05)
                print(f"async tick {sid}", flush=True)
        except asyncio.CancelledError:
            print(f"async cancelled {sid}", flush=True)
            raise

    doc.add_next_tick_callback(forever)
    # The script's globals are gone by the time the hook runs; keep the id in a default.
    doc.on_session_destroyed(lambda session_context, sid=sid: print(f"session destroyed {sid}", flush=True))
