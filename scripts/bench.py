#!/usr/bin/env python3
"""Benchmark evaluations, solves and the race to a loss: the same as `nstjax bench` (--help)."""

import sys

from nstjax.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
