"""Reliability tooling: load / soak, faults and fuzzing against a real adasd server (loopback only).

    python -m scripts.reliability.load   --help
    python -m scripts.reliability.faults --help
    python -m scripts.reliability.fuzz   --help

Every script either starts its own server (`--target/--draft`, on 127.0.0.1 and a free port) or
talks to one already running (`--url`, which must be a loopback address). All traffic is bounded
in count and time and stops by itself.
"""
