PYTHON ?= python

# bokeh serve vs flask-docsync serve on bench/apps, alternated in one run (~15 min;
# `make bench ARGS=--quick` for ~3 min). Needs psutil and numpy (the test extras).
.PHONY: bench
bench:
	$(PYTHON) bench/run.py $(ARGS)
