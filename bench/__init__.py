"""tokenpool's benchmark suite: ``python -m bench`` (``make bench``).

Each figure is the median of several runs (with min and max); every ratio
is taken between figures measured in the same run on the same machine.
"""
