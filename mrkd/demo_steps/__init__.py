"""The steps of ``mrkd demo`` that drive the export and runtime layers, kept beside mrkd/demo.py and
out of those library packages. mrkd/demo.py lists them by name (DEMO_LAYER_STEPS) and imports each
only when the demo runs, leaving out, with a note, a layer that is not installed."""
