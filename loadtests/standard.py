"""Locust scenario: the open-loop baseline of the paper, the gateway with the controller off
(every request runs the full model). Same options as loadtests/bio.py.

    locust -f loadtests/standard.py --headless -u 20 -r 5 -t 30s
"""
from loadtests import scenario
from loadtests.scenario import ClosedLoopUser, CongestionShape, OpenLoopUser  # noqa: F401  (Locust finds them)

scenario.configure("standard")
