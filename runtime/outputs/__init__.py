"""What the line tells the outside world: every output is a ``LineObserver`` (base.py).

events.py (JSON-lines log, snapshots, webhook), mqtt.py, metrics.py (Prometheus), web.py (the
operator page), video.py (annotated video file, window), overlay.py (heat-map drawing).
"""
