"""The line: the cameras one process watches and the one loop that scores them.

loop.py (``Line``, ``Camera``, ``run_line``), stream.py (its one-camera case), linefile.py (``--line``
TOML files), alarms.py (the decision rule and the alarm policy), stats.py (latency windows).
Triggered inspection: parts.py (the part runner, the one TriggerTarget), trigger.py (stdin/timer
trigger drivers). A model on the line: swap.py (hot swap), shadow.py (a candidate scored alongside).
"""
