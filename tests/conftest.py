"""Shared test set-up: CPU only, Triton under the interpreter, matplotlib headless, fixed thread counts."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")
