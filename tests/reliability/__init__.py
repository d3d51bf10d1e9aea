"""Load-and-faults reliability suite: real senders, a real node process, real faults, checked instance by instance.

``python -m tests.reliability [--full]`` runs every scenario and prints the table; ``test_reliability.py`` runs
the short versions under pytest (marked slow). See docs/reliability.md.
"""
