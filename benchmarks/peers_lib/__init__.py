"""Parts of benchmarks/peers.py: the workload, the trainers' commands, their environments, the figures."""
