"""The line: the cameras one process watches and the one loop that scores them.

loop.py (``Line``, ``Camera``, ``run_line``), stream.py (its one-camera case), linefile.py (``--line``
TOML files), alarms.py (the decision rule and the alarm policy), stats.py (latency windows).
"""
