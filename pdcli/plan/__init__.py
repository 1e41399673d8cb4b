"""`pdcli plan`: which layout serves a traffic best on N GPUs, predicted from the fitted profile by
simulating the workers (sim.py, simulator.py), and checked against recorded runs (validate.py)."""
