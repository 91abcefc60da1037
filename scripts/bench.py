#!/usr/bin/env python3
"""Benchmark loss+gradient evaluations and solves: the same as `nstjax bench` (see --help)."""

import sys

from nstjax.bench import cli

if __name__ == "__main__":
    sys.exit(cli())
