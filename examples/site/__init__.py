"""An example Flask site embedding live Bokeh documents; see app.py and run.py."""
