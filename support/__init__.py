"""What the learner's core leans on but need not read to follow a training step.

The checkpoint format and the reading of older ones, run folders, devices and processes, the
training session's plumbing (lock, signals, resume, logs), the command-line builder, the fast
paths (each proven equal to the readable one), Hugging Face, and the web demo's backend.
Nothing here imports the scripts at the root or the tools.
"""
