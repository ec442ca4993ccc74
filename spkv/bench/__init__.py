"""Speed and memory benchmarks (protocols.md, "Speed and memory"): decode.py, prefill.py and
train_step.py, over what common.py and machine.py share."""
