"""Commands a user runs now and then, each from the project folder by its path.

`python tools/bench.py` (speed and memory figures; `--vs-nanogpt` side by side),
`python tools/compare_runs.py` (the runs under out/, as a table and a plot) and
`python tools/export_model.py` (a checkpoint as a Hugging Face folder).
"""
