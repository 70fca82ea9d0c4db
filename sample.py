#!/usr/bin/env python3
"""Batch generation: python sample.py --model DIR --prompt "Once upon a time" [--max-new-tokens 100 ...]

See `python sample.py --help`; the logic lives in jaxar.decode.cli.
"""
from jaxar.decode.cli import main

if __name__ == "__main__":
    main()
