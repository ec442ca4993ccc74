"""RULER-style long-context tasks: prompts.py generates them from seeds, runner.py decodes them
through each method's cache (resumable), report.py makes the tables."""
