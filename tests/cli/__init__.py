"""Tests of the ``neuromerge`` command line: one file per command (src/neuromerge/cli/<command>.py),
test_main.py for the top level, helpers.py for what several share."""
