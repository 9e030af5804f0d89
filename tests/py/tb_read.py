"""Reads a run directory's TensorBoard event file with tensorboard's own reader and prints
{tag: [[step, value], ...]} as JSON.  usage: tb_read.py RUN_DIR"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1])
acc.Reload()
print(json.dumps({tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}))
