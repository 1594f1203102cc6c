"""`megatron-dots plan`: will a layout fit, and how fast will it run, before a GPU is spent.

layout.py (one candidate layout and its rules), static_memory.py (parameters, gradients and
optimizer state per rank, exact), activations.py (activation, pipeline, all-to-all and logits
memory per rank), hardware.py + step_time.py (roofline op times into the schedule simulator),
memory.py (the per-rank breakdown against the GPU), search.py, report.py, figures.py, cli.py.
"""
