import os
import sys

# Tests exercise the *installed* package (with its compiled engine), never a
# stray copy of the source tree on sys.path.
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != ROOT]
