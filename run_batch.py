#!/usr/bin/env python3
"""Run a batch job: ``python run_batch.py --input prompts.jsonl [--output OUT] [--model DIR]``.

The same command as ``pagedbatch run``; see ``python run_batch.py --help``
and docs/jobs.md.
"""
from pagedbatch.cli import run

if __name__ == "__main__":
    run(prog_name="run_batch.py")
