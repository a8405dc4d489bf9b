"""Components every kind of job uses, training and evaluation alike (`jobs.training` and `jobs.evaluation` may
import this package, not each other):

- `console`: known library noise filtered, one line per print in Ray workers;
- `content`: the content check's probe conversations and the training-time monitor (does the audio path carry
  content?).
"""
