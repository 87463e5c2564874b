"""Locust scenario: the gateway with the τ(t) controller on.

    locust -f loadtests/bio.py --headless -u 20 -r 5 -t 30s
    locust -f loadtests/bio.py --headless --shape spike --base-users 4 --phase-s 5
    locust -f loadtests/bio.py --headless --arrival-rate 200 -t 20s      # open loop

Options: see `locust -f loadtests/bio.py --help` (group green-mlops) and the README.
"""
from loadtests import scenario
from loadtests.scenario import ClosedLoopUser, CongestionShape, OpenLoopUser  # noqa: F401  (Locust finds them)

scenario.configure("bio")
