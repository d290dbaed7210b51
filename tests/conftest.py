"""Settings for the whole suite.

Hypothesis runs without its per-example deadline: no property here is about
speed (speed is measured in bench/), and on a loaded shared machine a
generated example can take longer than the 200 ms default for reasons that
say nothing about the code. Its "too slow to generate" health check goes for
the same reason. Every property still runs all its examples.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile("ferry", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ferry")
